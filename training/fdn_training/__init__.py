"""fdn_training: the training harness of the FDN (training loop, configs, ``fdn train``, ``fdn export`` and
``fdn train-baseline``).

Installed as the distribution ``fdn-training`` (``training/pyproject.toml``); its commands join the ``fdn``
command line of ``fdn_core`` through the entry-point group ``fdn.commands``.
"""
