"""SimSiam for self-supervised retrieval (Chen & He 2021, as used by seed 003, Wickstrøm et al.).

Encoder f = ``ResNetBackbone`` + global average pooling (the representation ``h`` used for retrieval, as in
seed 003: "the output of the average pooling layer"); projector g = 3-layer MLP with BatchNorm (the last BN
without affine parameters, as in SimSiam); predictor q = 2-layer bottleneck MLP. Training minimises
``SimSiamLoss(q(g(f(x1))), q(g(f(x2))), g(f(x1)), g(f(x2)))`` over two augmented views
(``fdn_core.baselines.augment.MRViewAugment``); no labels are used. Retrieval ranks by the cosine distance
between the ``h`` of two slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fdn_core.baselines.backbone import BackboneConfig, ResNetBackbone, init_weights
from fdn_core.errors import ConfigError

__all__ = ["SimSiam", "SimSiamConfig", "SimSiamOutput"]


@dataclass(frozen=True)
class SimSiamConfig:
    """``image_size``: input side; ``projector_dim``: projector width and output (SimSiam: 2048; ours
    smaller for a CPU budget); ``predictor_hidden``: the predictor's bottleneck (SimSiam: a quarter)."""

    __config_allow_defaults__ = True

    image_size: int = 64
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    projector_dim: int = 256
    predictor_hidden: int = 64

    def __post_init__(self) -> None:
        if self.image_size % self.backbone.downsampling:
            raise ConfigError(
                f"simsiam: image_size {self.image_size} must be divisible by {self.backbone.downsampling}"
            )
        if self.projector_dim < 2 or self.predictor_hidden < 1:
            raise ConfigError("simsiam: projector_dim must be >= 2 and predictor_hidden >= 1")

    @property
    def embedding_dim(self) -> int:
        """Length of the retrieval representation h."""
        return self.backbone.widths[-1]


@dataclass
class SimSiamOutput:
    """One view through the network: representation h (B, F), projection z (B, P), prediction p (B, P)."""

    h: torch.Tensor
    z: torch.Tensor
    p: torch.Tensor


class SimSiam(nn.Module):
    """Encoder, projector and predictor (module docstring)."""

    def __init__(self, config: SimSiamConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ResNetBackbone(config.backbone)
        f, p, hid = config.embedding_dim, config.projector_dim, config.predictor_hidden
        self.projector = nn.Sequential(
            nn.Linear(f, p, bias=False),
            nn.BatchNorm1d(p),
            nn.ReLU(inplace=True),
            nn.Linear(p, p, bias=False),
            nn.BatchNorm1d(p),
            nn.ReLU(inplace=True),
            nn.Linear(p, p, bias=False),
            nn.BatchNorm1d(p, affine=False),
        )
        self.predictor = nn.Sequential(
            nn.Linear(p, hid, bias=False), nn.BatchNorm1d(hid), nn.ReLU(inplace=True), nn.Linear(hid, p)
        )
        init_weights(self.projector)
        init_weights(self.predictor)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Retrieval representation h (B, F) of slices (B, C, S, S)."""
        return self.encoder.pooled(x)

    def forward(self, x: torch.Tensor) -> SimSiamOutput:
        """(B, 4, S, S) slices -> embedding, projection and prediction."""
        h = self.embed(x)
        z = self.projector(h)
        return SimSiamOutput(h=h, z=z, p=self.predictor(z))
