"""Training configs of the baselines: one YAML/JSON file per run with sections run / data / optimizer / model
and, per method, augment (SimSiam) or loss (Y-Net). Validated strictly by ``fdn_core.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fdn_core.baselines.augment import MRAugmentConfig
from fdn_core.baselines.losses import YNetLossConfig
from fdn_core.baselines.simsiam import SimSiamConfig
from fdn_core.baselines.ynet import YNetConfig
from fdn_core.config import load_config_file
from fdn_core.errors import ConfigError

__all__ = [
    "CONFIG_DIR",
    "DataSection",
    "OptimizerSection",
    "RunSection",
    "SimSiamTrainConfig",
    "YNetTrainConfig",
    "load_train_config",
]

#: Shipped configs (``<method>_<name>.yaml``).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class RunSection:
    """``seed``; stop at ``max_steps`` or after ``max_minutes`` of wall time (whichever first);
    ``log_every`` / ``val_every`` steps; ``checkpoint_every`` steps (a bundle under RUN/last)."""

    __config_allow_defaults__ = True

    seed: int = 0
    max_steps: int = 1000
    max_minutes: float | None = None
    log_every: int = 20
    val_every: int = 250
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.log_every < 1 or self.val_every < 1 or self.checkpoint_every < 1:
            raise ConfigError("run: max_steps, log_every, val_every and checkpoint_every must be >= 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"run.max_minutes={self.max_minutes}: must be > 0")


@dataclass(frozen=True)
class DataSection:
    """``image_size`` of the model input (the FDN's preprocessing: ``volume_to_slices``); ``batch_size``;
    a case-wise validation split (``val_fraction``, ``split_seed``); training slices need at least
    ``min_brain_fraction`` of their pixels inside the brain (empty slices teach nothing); ``val_slices``:
    validation slices embedded for the retrieval check."""

    __config_allow_defaults__ = True

    image_size: int = 64
    batch_size: int = 32
    val_fraction: float = 0.1
    split_seed: int = 0
    min_brain_fraction: float = 0.05
    val_slices: int = 800

    def __post_init__(self) -> None:
        if self.batch_size < 4:
            raise ConfigError(f"data.batch_size={self.batch_size}: needs >= 4 (BatchNorm, pairs)")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction}: must be within (0, 1)")
        if not 0 <= self.min_brain_fraction < 1 or self.val_slices < 1:
            raise ConfigError("data: min_brain_fraction must be within [0, 1) and val_slices >= 1")


@dataclass(frozen=True)
class OptimizerSection:
    """SGD with momentum (seeds 003 and 004) or Adam; ``lr`` is the base rate, scaled by batch/256 when
    ``scale_lr_by_batch`` (SimSiam's rule: 0.05 x batch / 256); cosine decay to 0 after ``warmup_steps``.
    ``fixed_predictor_lr``: SimSiam keeps the predictor's rate constant."""

    __config_allow_defaults__ = True

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    scale_lr_by_batch: bool = True
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    fixed_predictor_lr: bool = True
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("optimizer: lr must be > 0, weight_decay and warmup_steps >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError("optimizer.grad_clip must be > 0 or null")


@dataclass(frozen=True)
class SimSiamTrainConfig:
    """SimSiam run: no labels are read for training (the validation check uses them)."""

    __config_allow_defaults__ = True

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    model: SimSiamConfig = field(default_factory=SimSiamConfig)
    augment: MRAugmentConfig = field(default_factory=MRAugmentConfig)

    def __post_init__(self) -> None:
        if self.model.image_size != self.data.image_size:
            raise ConfigError(
                f"model.image_size={self.model.image_size} differs from "
                f"data.image_size={self.data.image_size}"
            )


@dataclass(frozen=True)
class YNetTrainConfig:
    """Y-Net run. ``flip_prob`` / ``max_rotation_deg`` / ``scale_range``: label-preserving augmentation
    (the FDN's: left-right flip, about +-10 degrees, scale 0.9-1.1); ``partner_fraction``: share of each batch
    drawn as a positive partner (same lesion-class set, level within tolerance, another case) of another
    item, so every batch holds positive pairs for the circle loss."""

    __config_allow_defaults__ = True

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(
        default_factory=lambda: OptimizerSection(
            lr=0.01, scale_lr_by_batch=False, weight_decay=1e-3, fixed_predictor_lr=False
        )
    )
    model: YNetConfig = field(default_factory=YNetConfig)
    loss: YNetLossConfig = field(default_factory=YNetLossConfig)
    flip_prob: float = 0.5
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    partner_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.model.image_size != self.data.image_size:
            raise ConfigError(
                f"model.image_size={self.model.image_size} differs from "
                f"data.image_size={self.data.image_size}"
            )
        if not 0 <= self.partner_fraction <= 0.5:
            raise ConfigError(f"partner_fraction={self.partner_fraction}: must be within 0..0.5")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(f"scale_range={list(self.scale_range)}: need 0 < low <= high")


def load_train_config(method: str, spec: str | Path) -> SimSiamTrainConfig | YNetTrainConfig:
    """A config file path, or a shipped name (``cpu``, ``tiny``: ``configs/<method>_<name>.yaml``)."""
    cls: type[SimSiamTrainConfig] | type[YNetTrainConfig]
    if method == "simsiam":
        cls = SimSiamTrainConfig
    elif method == "ynet":
        cls = YNetTrainConfig
    else:
        raise ConfigError(f"unknown baseline {method!r}; choose simsiam or ynet")
    path = Path(spec)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{method}_{spec}.yaml"
        if not path.is_file():
            known = sorted(p.stem.split("_", 1)[1] for p in CONFIG_DIR.glob(f"{method}_*.yaml"))
            raise ConfigError(f"no shipped {method} config {spec!r}; known: {known}, or give a file path")
    return load_config_file(cls, path)
