"""Training of the retrieval baselines (SimSiam, seed 003; Y-Net hash codes, seed 004): configs, the loop and
the ``fdn train-baseline`` command. The models themselves live in ``fdn_core.baselines``."""
