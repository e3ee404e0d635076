"""A small ResNet-style backbone shared by the baselines (He et al. 2016 basic blocks, BatchNorm + ReLU).

Seed 003 uses a ResNet50 and seed 004 a residual main branch; on our 2-core CPU budget both become this
four-stage network of basic blocks (channel widths and blocks per stage are config values). Stage 1 keeps the
input resolution, every later stage halves it: 64x64 slices and 4 stages give an 8x8 final map, the grid the
FDN's codes and Y-Net's R-MAC work on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fdn_core.errors import ConfigError

__all__ = ["BackboneConfig", "BasicBlock", "ResNetBackbone", "init_weights"]


@dataclass(frozen=True)
class BackboneConfig:
    """Backbone shape: ``widths`` per stage (the first is the stem's), ``blocks`` per stage."""

    __config_allow_defaults__ = True

    in_channels: int = 4
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: tuple[int, ...] = (1, 1, 1, 1)

    def __post_init__(self) -> None:
        if self.in_channels < 1 or not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(
                f"backbone: in_channels {self.in_channels} and widths {self.widths} must be > 0"
            )
        if len(self.blocks) != len(self.widths) or any(b < 1 for b in self.blocks):
            raise ConfigError(
                f"backbone: blocks {self.blocks} needs one positive entry per stage width {self.widths}"
            )

    @property
    def downsampling(self) -> int:
        """Input size / final map size."""
        return int(2 ** (len(self.widths) - 1))


class BasicBlock(nn.Module):
    """conv3x3 - BN - ReLU - conv3x3 - BN, plus the (projected when the shape changes) input, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the block's output."""
        return self.act(self.body(x) + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """Stem (3x3 conv, BN, ReLU at full resolution) and one stage of basic blocks per width.

    ``forward(x)`` returns the feature maps of every stage, finest first (Y-Net's FPN needs them all);
    ``pooled(x)`` the global average of the last one, the representation seed 003 retrieves with."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, w[0], 3, padding=1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(True)
        )
        stages = []
        prev = w[0]
        for i, (width, n) in enumerate(zip(w, config.blocks)):
            layers = [BasicBlock(prev, width, stride=1 if i == 0 else 2)]
            layers += [BasicBlock(width, width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            prev = width
        self.stages = nn.ModuleList(stages)
        init_weights(self)

    @property
    def out_channels(self) -> int:
        """Channels of the last stage."""
        return self.config.widths[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 4, S, S) slices -> the feature maps of the four stages (strides 2 to 16)."""
        h = self.stem(x)
        maps = []
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) global average of the last stage's map."""
        return self.forward(x)[-1].mean(dim=(2, 3))


def init_weights(module: nn.Module) -> None:
    """He initialisation of convolutions (fan-out, ReLU), BatchNorm at weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
