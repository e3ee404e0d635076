"""Building blocks of the feature decomposing network (notes/fdn-method.md, "Network").

Pre-activation residual blocks (GroupNorm(8) -> LeakyReLU(0.2) -> 3x3 conv, twice, plus identity),
strided down steps, bilinear up steps, SPADE residual blocks and the EMA vector quantiser.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.vector_quantizer import EMAQuantizer
from torch import nn

__all__ = [
    "GROUPS",
    "NEGATIVE_SLOPE",
    "SPADE",
    "DownStep",
    "FP32EMAQuantizer",
    "ResBlock",
    "SPADEResBlock",
    "UpStep",
    "he_init",
]

GROUPS = 8
NEGATIVE_SLOPE = 0.2


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(NEGATIVE_SLOPE)


def he_init(module: nn.Module) -> None:
    """He (Kaiming) normal initialisation for every convolution, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=NEGATIVE_SLOPE, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResBlock(nn.Module):
    """Pre-activation residual block; a 1x1 convolution shortcut when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(GROUPS, in_channels),
            _act(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(GROUPS, out_channels),
            _act(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.shortcut: nn.Module = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + F(x) (the shortcut projects x when the channel count changes)."""
        return self.shortcut(x) + self.body(x)


class DownStep(nn.Sequential):
    """GroupNorm -> LeakyReLU -> 3x3 stride-2 convolution (halves H and W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.GroupNorm(GROUPS, in_channels),
            _act(),
            nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
        )


class UpStep(nn.Sequential):
    """Bilinear x2 upsampling, then a 3x3 convolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )


class SPADE(nn.Module):
    """Spatially adaptive normalisation: parameter-free BatchNorm, modulated by a conditioning map.

    out = BN(x) * (1 + gamma(c)) + beta(c), with gamma/beta from a small conv net on the map ``c``
    resized (area average) to x's size. Own module rather than monai's SPADE because that one
    instance-normalises gamma and beta (so a spatially constant map gives zero modulation and a local
    map modulates the whole image) and resizes the map by nearest neighbour (which drops small lesions
    at coarse layers); the paper follows Park et al. with plain convolutions.
    """

    def __init__(self, label_channels: int, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(label_channels, hidden_channels, 3, padding=1), _act())
        self.gamma = nn.Conv2d(hidden_channels, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden_channels, channels, 3, padding=1)

    def _modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.shared(cond)
        return self.gamma(hidden), self.beta(hidden)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, null: int = 0) -> torch.Tensor:
        """Modulate ``x`` (B + null, C, H, W) by ``cond`` (B, L, h, w); the last ``null`` samples of ``x``
        get the all-zero map, whose gamma/beta are computed once and broadcast (same result, less work)."""
        if cond.shape[-2:] != x.shape[-2:]:
            cond = F.interpolate(cond, size=x.shape[-2:], mode="area")
        gamma, beta = self._modulation(cond)
        if null:
            g0, b0 = self._modulation(cond.new_zeros((1, *cond.shape[1:])))
            gamma = torch.cat([gamma, g0.expand(null, -1, -1, -1)])
            beta = torch.cat([beta, b0.expand(null, -1, -1, -1)])
        return self.norm(x) * (1 + gamma) + beta


class SPADEResBlock(nn.Module):
    """Residual block of the image decoder: (SPADE -> LeakyReLU -> 3x3 conv) twice, plus identity."""

    def __init__(
        self, in_channels: int, out_channels: int, label_channels: int, hidden_channels: int
    ) -> None:
        super().__init__()
        self.norm1 = SPADE(label_channels, in_channels, hidden_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = SPADE(label_channels, out_channels, hidden_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = _act()
        self.shortcut: nn.Module = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor, null: int = 0) -> torch.Tensor:
        """Residual block on ``x`` conditioned on ``cond``; the last ``null`` samples get the zero map."""
        h = self.conv1(self.act(self.norm1(x, cond, null)))
        h = self.conv2(self.act(self.norm2(h, cond, null)))
        return self.shortcut(x) + h


class FP32EMAQuantizer(EMAQuantizer):
    """monai's EMA vector quantiser, run in float32 with autocast disabled on every device type, with
    optional dead-code restarts.

    monai's EMAQuantizer matches the paper (nearest neighbour in L2, straight-through gradient, EMA
    codebook with Laplace-smoothed counts, commitment loss, all-reduce of the EMA statistics under
    torch.distributed, index grids in (h, w) row-major order). It disables autocast only around the
    distance computation, so under bf16 autocast its EMA statistics (a matmul) would be rounded to
    bf16; this subclass keeps the whole quantiser, EMA update included, in float32.

    Dead codes (our addition; the paper has none): with the EMA update, a code that the data never selects
    is divided by its near-zero smoothed count once (its norm jumps to ~1e5) and then only decays, so it
    stays unused and its binarised bits are noise (measured on the first shipped model: 166 of 256
    abnormal codes dead). With ``restart_threshold > 0`` (set by the trainer; not part of the saved model),
    after each EMA update every code whose share of the EMA cluster mass is below ``restart_threshold``
    times the uniform share 1/K is moved onto an encoder output of the batch, sampled with probability
    proportional to its squared distance to the nearest code (k-means++ seeding: the worst-represented
    inputs first), and given the uniform share of the mass. Shares need no bias correction (the EMA mass
    of every code sums to the batch size times 1 - decay^t), so the rule holds from the first step, where it
    seeds every unused code from the data. Under torch.distributed the vectors are chosen on rank 0 and
    broadcast, so codebooks stay identical on every rank. ``restarts`` counts restarted codes.
    """

    restart_threshold: float = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.restarts = 0

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q, straight-through; commitment loss; indices (B, h, w)); EMA update in train mode."""
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            out = super().forward(inputs.float())
            if self.training and self.restart_threshold > 0.0:
                self._restart_dead_codes(inputs.detach().float())
            return out

    @torch.no_grad()
    def _restart_dead_codes(self, inputs: torch.Tensor) -> None:
        sizes = self.ema_cluster_size  # identical on every rank (the statistics are all-reduced)
        uniform = sizes.sum() / self.num_embeddings
        dead = sizes < self.restart_threshold * uniform
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        flat = inputs.permute(self.flatten_permutation).reshape(-1, self.embedding_dim)
        codebook = self.embedding.weight
        sq_dist = (flat**2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + (codebook**2).sum(1)[None, :]
        # Non-finite latents (a diverging run) must not crash the sampling; the loss check reports them.
        dist = torch.nan_to_num(sq_dist.amin(1), nan=0.0, posinf=0.0)
        picks = torch.multinomial(dist.clamp_min(0) + 1e-12, n_dead, replacement=n_dead > flat.shape[0])
        vectors = flat[picks].contiguous()
        if self.ddp_sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(vectors, src=0)
        sizes[dead] = uniform
        n = sizes.sum()
        smoothed = (sizes + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.ema_w[dead] = vectors * smoothed[dead, None]
        self.embedding.weight.data.copy_(self.ema_w / smoothed[:, None])
        self.restarts += n_dead

    def indices(self, inputs: torch.Tensor) -> torch.Tensor:
        """Nearest-codebook indices (B, h, w) int64 of ``inputs`` (B, D, h, w); never updates the codebook."""
        with torch.no_grad(), torch.autocast(device_type=inputs.device.type, enabled=False):
            return self.quantize(inputs.float())[2]

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, D, h, w) float32 for an index grid (B, h, w)."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self.embed(indices)
