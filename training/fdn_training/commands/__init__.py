"""The commands the training harness adds to ``fdn`` (entry-point group ``fdn.commands``)."""

from fdn_training.commands.export import register as register_export
from fdn_training.commands.train import register as register_train

__all__ = ["register_export", "register_train"]
