"""fdn_training: the training harness of the FDN (training loop, configs, ``fdn train`` and ``fdn export``).

Installed as the distribution ``fdn-training`` (``training/pyproject.toml``); its commands join the ``fdn``
command line of ``fdn_core`` through the entry-point group ``fdn.commands``.
"""
