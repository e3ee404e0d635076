"""The training configuration: one validated dataclass with sections, loaded strictly from YAML/JSON.

Shape (in the spirit of the FDN authors' run / save / loss_weight / dataset / model / optimizer JSON):
``run`` (seed, length, logging), ``save`` (checkpoints, best-model metric), ``dataset`` (batching, split,
augmentation), ``preprocess`` (PreprocessConfig), ``model`` (FDNConfig), ``loss`` (LossConfig: the loss
weights) and ``optimizer`` (generator and critic Adam). Every key must be present; unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from fdn_core.config import config_from_dict, config_to_dict, load_config_file
from fdn_core.data.preprocess import PreprocessConfig
from fdn_core.errors import ConfigError
from fdn_core.losses import LossConfig
from fdn_core.model import FDNConfig

__all__ = [
    "CONFIG_DIR",
    "DatasetConfig",
    "OptimizerConfig",
    "RunConfig",
    "SaveConfig",
    "TrainConfig",
    "load_train_config",
    "shipped_configs",
]

#: Folder of the shipped configs (fdn8x8_256.yaml, demo_cpu.yaml, tiny_test.yaml).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class RunConfig:
    """seed: every random number of the run derives from it. epochs: passes over the training slices
    (paper: 400). max_steps: optional cap on generator steps (null: epochs decide; ``--max-steps`` sets it).
    log_every: steps between CSV/TensorBoard rows. val_every: steps between validations (0: at the end of
    each epoch only). num_workers: DataLoader worker processes. tensorboard: also write TensorBoard logs.
    """

    seed: int
    epochs: int
    max_steps: int | None
    log_every: int
    val_every: int
    num_workers: int
    tensorboard: bool

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"run.epochs={self.epochs}: must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"run.max_steps={self.max_steps}: must be >= 1 or null")
        if self.log_every < 1:
            raise ConfigError(f"run.log_every={self.log_every}: must be >= 1")
        if self.val_every < 0:
            raise ConfigError(f"run.val_every={self.val_every}: must be >= 0 (0 = once per epoch)")
        if self.num_workers < 0:
            raise ConfigError(f"run.num_workers={self.num_workers}: must be >= 0")


@dataclass(frozen=True)
class SaveConfig:
    """checkpoint_every: steps between checkpoints (one is always written at the end).
    best_metric: what picks the kept best checkpoint on the validation cases: ``val_loss`` (generator loss
    without the adversarial term, lower is better) or ``val_dice`` (pooled whole-slice Dice over the three
    abnormal classes, higher is better).
    """

    checkpoint_every: int
    best_metric: Literal["val_loss", "val_dice"]

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ConfigError(f"save.checkpoint_every={self.checkpoint_every}: must be >= 1")


@dataclass(frozen=True)
class DatasetConfig:
    """batch_size: slices per generator step (summed over all processes under DDP; paper 112).
    val_fraction: share of cases held out (case-wise) for validation. split_seed: seed of that split.
    augment: random flip / rotation / scaling of training slices. val_max_slices: validation uses at most
    this many slices (evenly spread over the validation set; 0 = all).
    """

    batch_size: int
    val_fraction: float
    split_seed: int
    augment: bool
    val_max_slices: int

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ConfigError(
                f"dataset.batch_size={self.batch_size}: must be >= 2 (batch normalisation in the image "
                "decoder and the healthy/diseased split of distribution matching need several slices)"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"dataset.val_fraction={self.val_fraction}: must be in (0, 1)")
        if self.val_max_slices < 0:
            raise ConfigError(f"dataset.val_max_slices={self.val_max_slices}: must be >= 0 (0 = all)")


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam for the generator (encoder, codebook commitment, decoders) and a separate Adam for the critic.

    Paper: lr 1e-4, weight decay 1e-5. grad_clip: max global gradient norm of the generator (null: no
    clipping). critic_steps: critic updates per generator step (paper m = 5) when distribution matching
    is on.
    """

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float | None
    critic_lr: float
    critic_weight_decay: float
    critic_betas: tuple[float, float]
    critic_steps: int

    def __post_init__(self) -> None:
        for name in ("lr", "critic_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"optimizer.{name}={getattr(self, name)}: must be > 0")
        for name in ("weight_decay", "critic_weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optimizer.{name}={getattr(self, name)}: must be >= 0")
        for name in ("betas", "critic_betas"):
            if not all(0.0 <= b < 1.0 for b in getattr(self, name)):
                raise ConfigError(
                    f"optimizer.{name}={list(getattr(self, name))}: each beta must be in [0, 1)"
                )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"optimizer.grad_clip={self.grad_clip}: must be > 0 or null")
        if self.critic_steps < 1:
            raise ConfigError(f"optimizer.critic_steps={self.critic_steps}: must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved (resolved) beside every checkpoint."""

    run: RunConfig
    save: SaveConfig
    dataset: DatasetConfig
    preprocess: PreprocessConfig
    model: FDNConfig
    loss: LossConfig
    optimizer: OptimizerConfig

    def __post_init__(self) -> None:
        if self.preprocess.image_size != self.model.image_size:
            raise ConfigError(
                f"preprocess.image_size={self.preprocess.image_size} differs from model.image_size="
                f"{self.model.image_size}; the model's input is the preprocessed slice: set both to one size"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (what is written to config.yaml and embedded in checkpoints)."""
        return config_to_dict(self)

    def with_max_steps(self, max_steps: int | None) -> TrainConfig:
        """A copy with ``run.max_steps`` replaced (the ``--max-steps`` override)."""
        return replace(self, run=replace(self.run, max_steps=max_steps))


def load_train_config(source: str | Path | dict[str, Any]) -> TrainConfig:
    """Load a TrainConfig from a YAML/JSON file, a shipped config name (``tiny_test``) or a dict."""
    if isinstance(source, dict):
        return config_from_dict(TrainConfig, source, where="config")
    path = Path(source)
    if not path.exists() and path.suffix == "" and (CONFIG_DIR / f"{path.name}.yaml").exists():
        path = CONFIG_DIR / f"{path.name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(shipped_configs()))
        raise ConfigError(
            f"{path}: config file not found; give a YAML/JSON path or a shipped config ({known})"
        )
    return load_config_file(TrainConfig, path)


def shipped_configs() -> dict[str, Path]:
    """Name -> path of every YAML config shipped in ``training/configs``."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}
