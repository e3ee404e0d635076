"""Y-Net hash codes (seed 004, Fang et al.): a residual main branch, an FPN segmentation branch and an R-MAC
classification / hashing branch on the same core features.

- Main branch: ``ResNetBackbone``; its last stage is the "core node" (seed 004: 8x8 at the end of the main
  branch; ours: 64x64 slices -> 8x8 with 4 stages).
- FPN branch (segmentation, seed 004 section III-D): lateral 1x1 convolutions to ``fpn_channels`` on every
  stage, top-down bilinear x2 upsampling and element-wise addition from the core node to full resolution,
  then 3x3 conv, BN, ReLU and a 1x1 conv to the 4 abnormal classes (0 background, 1 NCR/NET, 2 ED, 3 ET).
- R-MAC branch (section III-C): 3x3 conv + BN (+ ReLU) on the core node, ``rmac`` over 3 scales (14 regions
  on 8x8), L2-normalised descriptor (B, ``rmac_channels``). From it:
  * a classification head (linear; seed 004 maps the L2-normalised R-MAC vector to the classes): logits of
    the presence of each abnormal class in the slice;
  * the hash layer: linear to ``hash_bits``, tanh (relaxed code ``u`` in (-1, 1), trained with the circle
    loss), and at test time sign(u) -> bits. Seed 004's test-time code came from an untrained convolution of
    the core features (our style notes: "Y-Net's retrieval vector was never trained"); ours is trained.
Retrieval ranks by the Hamming distance between the bits of two slices (64 bits, as seed 004 reports).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fdn_core.baselines.backbone import BackboneConfig, ResNetBackbone, init_weights
from fdn_core.baselines.rmac import rmac
from fdn_core.errors import ConfigError

__all__ = ["YNet", "YNetConfig", "YNetOutput"]


@dataclass(frozen=True)
class YNetConfig:
    """Shape of Y-Net (module docstring). ``num_classes``: segmentation classes (background included);
    ``hash_bits``: code length (seed 004: 64); ``rmac_scales``: R-MAC scales (seed 004: 3)."""

    __config_allow_defaults__ = True

    image_size: int = 64
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn_channels: int = 32
    rmac_channels: int = 128
    rmac_scales: int = 3
    num_classes: int = 4
    hash_bits: int = 64

    def __post_init__(self) -> None:
        if self.image_size % self.backbone.downsampling:
            raise ConfigError(
                f"ynet: image_size {self.image_size} must be divisible by {self.backbone.downsampling}"
            )
        if min(self.fpn_channels, self.rmac_channels, self.rmac_scales, self.hash_bits) < 1:
            raise ConfigError("ynet: fpn_channels, rmac_channels, rmac_scales and hash_bits must be >= 1")
        if self.num_classes < 2:
            raise ConfigError(f"ynet: num_classes {self.num_classes} must be >= 2 (background + lesion)")

    @property
    def core_size(self) -> int:
        """Side of the core node's map."""
        return self.image_size // self.backbone.downsampling


@dataclass
class YNetOutput:
    """Segmentation logits (B, K, S, S), class-presence logits (B, K-1), relaxed code u (B, bits) and the
    R-MAC descriptor (B, C)."""

    seg_logits: torch.Tensor
    class_logits: torch.Tensor
    hash_relaxed: torch.Tensor
    descriptor: torch.Tensor


class YNet(nn.Module):
    """Main branch, FPN branch, R-MAC branch (module docstring)."""

    def __init__(self, config: YNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ResNetBackbone(config.backbone)
        c = config.fpn_channels
        self.lateral = nn.ModuleList(nn.Conv2d(w, c, 1) for w in config.backbone.widths)
        self.seg_head = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, config.num_classes, 1),
        )
        r = config.rmac_channels
        self.rmac_conv = nn.Sequential(
            nn.Conv2d(self.encoder.out_channels, r, 3, padding=1, bias=False),
            nn.BatchNorm2d(r),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(r, config.num_classes - 1)
        self.hash_layer = nn.Linear(r, config.hash_bits)
        init_weights(self)

    def descriptor(self, core: torch.Tensor) -> torch.Tensor:
        """L2-normalised R-MAC descriptor (B, C) of core features."""
        return rmac(self.rmac_conv(core), self.config.rmac_scales)

    def forward(self, x: torch.Tensor) -> YNetOutput:
        """(B, 4, S, S) slices -> segmentation logits, class logits and relaxed hash codes."""
        maps = self.encoder(x)
        top = self.lateral[-1](maps[-1])
        for lateral, fmap in zip(reversed(self.lateral[:-1]), reversed(maps[:-1])):
            top = lateral(fmap) + F.interpolate(
                top, size=fmap.shape[-2:], mode="bilinear", align_corners=False
            )
        seg_logits = self.seg_head(top)
        desc = self.descriptor(maps[-1])
        return YNetOutput(
            seg_logits=seg_logits,
            class_logits=self.classifier(desc),
            hash_relaxed=torch.tanh(self.hash_layer(desc)),
            descriptor=desc,
        )

    def relaxed_code(self, x: torch.Tensor) -> torch.Tensor:
        """tanh outputs u (B, bits) without the segmentation branch (inference)."""
        return torch.tanh(self.hash_layer(self.descriptor(self.encoder(x)[-1])))

    def hash_bits(self, x: torch.Tensor) -> torch.Tensor:
        """Binary codes (B, bits) uint8 in {0, 1}: 1 where u >= 0."""
        return (self.relaxed_code(x) >= 0).to(torch.uint8)
