"""fdn_training: the command-line harness (``fdn``) over fdn_core: train, index, query, evaluate, demo."""
