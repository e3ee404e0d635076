"""Critic of the distribution matching (WGAN-GP on normal anatomy codes, paper Table C.3)."""

from __future__ import annotations

import torch
from torch import nn

from fdn_core.model.blocks import NEGATIVE_SLOPE, he_init

__all__ = ["Critic"]


class Critic(nn.Module):
    """g(z): stride-2 4x4 convolutions down to 1x1, then two 1x1 convolutions to one score per sample.

    Input: normal codes (B, code_dim, s, s) with s a power of two (4, 8, 16 or 32). Output: (B,) scores.
    No normalisation layers (the gradient penalty needs per-sample gradients).
    """

    def __init__(self, code_dim: int, latent_size: int, channels: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, s = code_dim, latent_size
        while s > 1:
            layers += [nn.Conv2d(c, channels, 4, stride=2, padding=1), nn.LeakyReLU(NEGATIVE_SLOPE)]
            c, s = channels, s // 2
        layers += [nn.Conv2d(c, channels, 1), nn.LeakyReLU(NEGATIVE_SLOPE), nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)
        he_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Scalar score per code grid (B, D, h, w) -> (B,); high for healthy-looking normal codes."""
        return self.net(z).flatten(1).squeeze(1)
