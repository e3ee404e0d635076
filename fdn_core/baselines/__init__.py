"""Retrieval baselines the FDN is compared with, re-implemented from their papers on our slices.

- SimSiam (seed 003, Wickstrøm et al.: self-supervised CBIR with domain-knowledge augmentation):
  ``simsiam`` (encoder, projector, predictor), ``augment`` (MR view augmentation), ``losses.SimSiamLoss``.
- Y-Net (seed 004, Fang et al.: segmentation + classification branches, R-MAC, circle loss, hash codes):
  ``ynet``, ``rmac``, ``losses.CircleLoss`` / ``losses.YNetLoss``.
- ``backbone``: the small ResNet both use; ``bundle``: verified safetensors bundles (``save_baseline`` /
  ``load_baseline``); ``methods``: the bundles as ranking methods of the shared retrieval protocol.

Training lives in ``fdn_training.baselines`` (``fdn train-baseline simsiam|ynet``).
"""

from fdn_core.baselines.bundle import BaselineBundle, load_baseline, save_baseline
from fdn_core.baselines.methods import SHIPPED_BASELINES, BaselineEmbedding, load_embedding_methods

__all__ = [
    "SHIPPED_BASELINES",
    "BaselineBundle",
    "BaselineEmbedding",
    "load_baseline",
    "load_embedding_methods",
    "save_baseline",
]
