"""Losses of the two baselines, each a small module with an explicit reduction so it can be checked against
hand-computed values (``Testing/test_baselines_losses.py``).

- ``negative_cosine`` / ``SimSiamLoss``: SimSiam's symmetrised negative cosine similarity with the
  stop-gradient on the target branch (Chen & He 2021; seed 003, eq. 1-3).
- ``CircleLoss``: the pair-wise circle loss of Sun et al. 2020, which Y-Net (seed 004, eq. 2 and section
  IV-B) uses with cosine similarity, scale 32 and margin 0.25.
- ``YNetLoss``: Y-Net's coupled loss ``omega * L_circle + (1 - omega) * L_seg`` (seed 004, eq. 2; omega =
  0.5), plus our classification term and a quantisation term (see the class docstring for what is ours).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fdn_core.errors import ConfigError, DataError

__all__ = [
    "CircleLoss",
    "SimSiamLoss",
    "YNetLoss",
    "YNetLossConfig",
    "class_set_codes",
    "negative_cosine",
    "pair_labels",
    "presence_from_seg",
]

Reduction = Literal["mean", "sum", "none"]


def _reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ConfigError(f"reduction {reduction!r}: use 'mean', 'sum' or 'none'")


def negative_cosine(
    p: torch.Tensor, z: torch.Tensor, stop_gradient: bool = True, reduction: Reduction = "mean"
) -> torch.Tensor:
    """D(p, z) = -p.z / (|p| |z|) per row (seed 003 eq. 1), with ``z`` detached when ``stop_gradient``
    (SimSiam's stopgrad: no gradient flows into the target branch)."""
    if p.shape != z.shape or p.ndim != 2:
        raise DataError(f"negative_cosine: p {tuple(p.shape)} and z {tuple(z.shape)} must be (B, F) alike")
    target = z.detach() if stop_gradient else z
    return _reduce(-F.cosine_similarity(p, target, dim=1), reduction)


class SimSiamLoss(nn.Module):
    """L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2 (Chen & He 2021, Algorithm 1).

    ``z`` are the projector outputs and ``p`` the predictor outputs of the two views. Seed 003 writes the
    same loss with its own letters (its eq. 3: ``z`` for the predicted, ``h`` for the target vector). The
    minimum is -1 (both views predict each other exactly)."""

    def __init__(self, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.reduction: Reduction = reduction

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Symmetric negative cosine of predictions and stop-gradient projections (SimSiam)."""
        return 0.5 * negative_cosine(p1, z2, True, self.reduction) + 0.5 * negative_cosine(
            p2, z1, True, self.reduction
        )


def pair_labels(
    class_sets: torch.Tensor, levels: torch.Tensor, level_tolerance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) boolean (B, B) pair masks of a batch, diagonal excluded from both.

    Positive pair: the same lesion-class set (``class_sets`` (B,) int: bit c-1 set when abnormal class c is
    present in the slice; 0 = no lesion) and relative axial levels ``levels`` (B,) in [0, 1] at most
    ``level_tolerance`` apart: same anatomy level and same kind of lesion, what S_sum asks for. Every other
    pair is negative."""
    if class_sets.shape != levels.shape or class_sets.ndim != 1:
        raise DataError("pair_labels: class_sets and levels must be (B,) alike")
    same_class = class_sets[:, None] == class_sets[None, :]
    near = (levels[:, None] - levels[None, :]).abs() <= level_tolerance
    eye = torch.eye(class_sets.shape[0], dtype=torch.bool, device=class_sets.device)
    positive = same_class & near & ~eye
    negative = ~(same_class & near) & ~eye
    return positive, negative


class CircleLoss(nn.Module):
    """Pair-wise circle loss (Sun et al. 2020, eq. 4 with the margins of eq. 6) on cosine similarities.

    For each anchor ``i`` with positive similarities ``s_p`` and negative similarities ``s_n`` (other batch
    items)::

        L_i = log(1 + sum_n exp(gamma * a_n * (s_n - d_n)) * sum_p exp(-gamma * a_p * (s_p - d_p)))
        a_p = [1 + m - s_p]_+,  a_n = [s_n + m]_+,  d_p = 1 - m,  d_n = m

    The weights ``a_p`` and ``a_n`` are treated as constants (no gradient through them), as in the circle-loss
    paper's optimisation. An anchor without a positive or without a negative contributes 0 (an empty sum).
    Defaults are Y-Net's: ``gamma`` (scale) 32, margin 0.25. ``forward(embeddings, positive, negative)``:
    embeddings (B, F) (cosine similarity is taken between rows), boolean (B, B) pair masks."""

    def __init__(self, scale: float = 32.0, margin: float = 0.25, reduction: Reduction = "mean") -> None:
        super().__init__()
        if scale <= 0 or not 0 <= margin < 1:
            raise ConfigError(f"circle loss: scale {scale} must be > 0 and margin {margin} in [0, 1)")
        self.scale, self.margin = float(scale), float(margin)
        self.reduction: Reduction = reduction

    def forward(
        self, embeddings: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
    ) -> torch.Tensor:
        """Circle loss over the pairs of a batch (``positive``/``negative``: boolean pair masks)."""
        b = embeddings.shape[0]
        if positive.shape != (b, b) or negative.shape != (b, b):
            raise DataError(f"circle loss: pair masks must be ({b}, {b})")
        x = F.normalize(embeddings.float(), dim=1)
        sim = x @ x.t()
        m, gamma = self.margin, self.scale
        a_p = torch.clamp_min(1.0 + m - sim.detach(), 0.0)
        a_n = torch.clamp_min(sim.detach() + m, 0.0)
        logit_p = -gamma * a_p * (sim - (1.0 - m))
        logit_n = gamma * a_n * (sim - m)
        neg_inf = torch.finfo(sim.dtype).min
        lse_p = torch.where(positive, logit_p, neg_inf).logsumexp(dim=1)
        lse_n = torch.where(negative, logit_n, neg_inf).logsumexp(dim=1)
        valid = positive.any(dim=1) & negative.any(dim=1)
        per_anchor = torch.where(valid, F.softplus(lse_p + lse_n), torch.zeros_like(lse_p))
        if self.reduction == "mean":
            # mean over the anchors that have both kinds of pairs (others carry no signal)
            return per_anchor.sum() / valid.sum().clamp_min(1)
        return _reduce(per_anchor, self.reduction)


@dataclass(frozen=True)
class YNetLossConfig:
    """Weights of Y-Net's loss. ``omega`` couples circle and segmentation losses as in seed 004 (eq. 2,
    omega = 0.5); ``w_cls`` weights our classification term (binary cross-entropy on the presence of each
    abnormal class, from the R-MAC descriptor); ``w_quant`` our quantisation term mean((|u| - 1)^2) on the
    tanh outputs ``u`` before the sign, so that the binary code keeps the trained similarities.
    ``scale`` / ``margin``: the circle loss's (seed 004: 32 and 0.25). ``level_tolerance``: positives are
    slices with the same lesion-class set whose relative axial levels differ by at most this (0.05 of the
    volume's height: about 8 slices of 155)."""

    __config_allow_defaults__ = True

    omega: float = 0.5
    w_cls: float = 0.5
    w_quant: float = 0.1
    scale: float = 32.0
    margin: float = 0.25
    level_tolerance: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 <= self.omega <= 1.0:
            raise ConfigError(f"loss.omega={self.omega}: must be within 0..1")
        if self.w_cls < 0 or self.w_quant < 0:
            raise ConfigError("loss.w_cls and loss.w_quant must be >= 0")
        if not 0.0 <= self.level_tolerance <= 1.0:
            raise ConfigError(f"loss.level_tolerance={self.level_tolerance}: must be within 0..1")


class YNetLoss(nn.Module):
    """``omega * L_circle + (1 - omega) * L_seg + w_cls * L_cls + w_quant * L_quant``.

    - ``L_seg``: pixel-wise cross-entropy of the FPN branch's logits against the abnormal labels (seed 004
      uses pixel-wise CE; classes 0..3).
    - ``L_circle``: ``CircleLoss`` on the hash layer's tanh outputs, pairs from ``pair_labels``.
    - ``L_cls``: BCE-with-logits of the classification head against the presence (B, 3) of NCR/NET, ED, ET.
    - ``L_quant``: mean((|u| - 1)^2) over the tanh outputs.

    ``forward`` returns (total, terms) with plain-float terms for logging."""

    def __init__(self, config: YNetLossConfig | None = None) -> None:
        super().__init__()
        self.config = config or YNetLossConfig()
        self.circle = CircleLoss(self.config.scale, self.config.margin)

    def forward(
        self,
        seg_logits: torch.Tensor,
        class_logits: torch.Tensor,
        hash_relaxed: torch.Tensor,
        seg: torch.Tensor,
        levels: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Y-Net's coupled loss (segmentation, presence, circle, quantisation) and its terms."""
        c = self.config
        presence = presence_from_seg(seg, class_logits.shape[1])
        class_sets = class_set_codes(presence)
        positive, negative = pair_labels(class_sets, levels, c.level_tolerance)
        l_seg = F.cross_entropy(seg_logits.float(), seg.long())
        l_circle = self.circle(hash_relaxed, positive, negative)
        l_cls = F.binary_cross_entropy_with_logits(class_logits.float(), presence.float())
        l_quant = ((hash_relaxed.float().abs() - 1.0) ** 2).mean()
        total = c.omega * l_circle + (1.0 - c.omega) * l_seg + c.w_cls * l_cls + c.w_quant * l_quant
        terms = {
            "loss": float(total.detach()),
            "circle": float(l_circle.detach()),
            "seg_ce": float(l_seg.detach()),
            "cls_bce": float(l_cls.detach()),
            "quant": float(l_quant.detach()),
            "positive_pairs": float(positive.sum()) / max(positive.shape[0], 1),
        }
        return total, terms


def presence_from_seg(seg: torch.Tensor, num_foreground: int = 3) -> torch.Tensor:
    """(B, num_foreground) float presence of abnormal classes 1..num_foreground in label maps (B, H, W)."""
    flat = seg.reshape(seg.shape[0], -1)
    return torch.stack([(flat == c).any(dim=1) for c in range(1, num_foreground + 1)], dim=1).float()


def class_set_codes(presence: torch.Tensor) -> torch.Tensor:
    """(B,) int64 lesion-class-set code of presence flags (B, C): sum of 2**(c-1) over present classes."""
    weights = 2 ** torch.arange(presence.shape[1], device=presence.device)
    return (presence.round().long() * weights).sum(dim=1)
