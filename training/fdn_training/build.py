"""The model and optimisers of a training config."""

from __future__ import annotations

import torch

from fdn_core.model import FDN
from fdn_training.trainconfig import TrainConfig

__all__ = ["build_model", "make_optimizers"]


def build_model(cfg: TrainConfig, device: torch.device, seed: int | None = None) -> FDN:
    """The FDN of ``cfg.model``, initialised from ``seed`` (default ``run.seed``), on ``device``, with
    ``codebook.restart_threshold`` set on both quantisers (it is a training setting: not saved in the
    model's weights, and restarts happen only in train mode)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed if seed is None else seed)
        model = FDN(cfg.model)
    for quantizer in (model.vq_normal, model.vq_abnormal):
        quantizer.restart_threshold = cfg.codebook.restart_threshold
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing in torch's stubs
    return model


def make_optimizers(cfg: TrainConfig, model: FDN) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for the generator (encoder and decoders) and Adam for the critic, as ``cfg.optimizer`` says."""
    o = cfg.optimizer
    opt_g = torch.optim.Adam(
        list(model.generator_parameters()), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay
    )
    opt_c = torch.optim.Adam(
        list(model.critic_parameters()),
        lr=o.critic_lr,
        betas=o.critic_betas,
        weight_decay=o.critic_weight_decay,
    )
    return opt_g, opt_c
