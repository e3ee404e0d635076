"""The training configuration: one validated dataclass with sections, loaded strictly from YAML/JSON.

Shape (in the spirit of the FDN authors' run / save / loss_weight / dataset / model / optimizer JSON):
``run`` (seed, length, logging), ``save`` (checkpoints, best-model metric), ``dataset`` (batching, split,
augmentation), ``sampling`` (which slices a step sees), ``preprocess`` (PreprocessConfig), ``model``
(FDNConfig), ``codebook`` (dead-code restarts), ``loss`` (LossConfig: the loss weights), ``optimizer``
(generator and critic Adam) and ``schedule`` (the generator's learning-rate schedule). Every key must be
present in a config file; unknown keys are errors.

Checkpoints written before the ``sampling`` / ``codebook`` / ``schedule`` sections existed hold configs
without them; ``upgrade_config_dict`` adds them with the values that reproduce how those runs trained
(uniform sampling, no restarts, constant learning rate). Config files get no such help: they stay strict.
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
    "LEGACY_SECTIONS",
    "CodebookConfig",
    "DatasetConfig",
    "OptimizerConfig",
    "RunConfig",
    "SamplingConfig",
    "SaveConfig",
    "ScheduleConfig",
    "TrainConfig",
    "load_train_config",
    "shipped_configs",
    "upgrade_config_dict",
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
class SamplingConfig:
    """Which training slices a step sees.

    mode ``uniform`` (the paper): every training slice once per epoch, in a seeded random order. Most axial
    slices of a volume are partly or wholly outside the brain, so a good share of the steps then goes to
    slices with (almost) nothing to learn from. mode ``weighted``: each epoch draws as many slices as
    ``uniform`` would (same steps per epoch), with replacement, from three groups in fixed shares:
    ``empty_share`` of the draws from *empty* slices (fewer than ``min_brain_fraction`` of their pixels
    non-zero in the preprocessed input), ``tumour_share`` from slices with an abnormal label, and the rest
    from brain slices without one. A group the training cases lack gives its share to the others
    (proportionally). Empty slices keep a small share so the model still sees what they look like.
    """

    mode: Literal["uniform", "weighted"]
    empty_share: float
    tumour_share: float
    min_brain_fraction: float

    def __post_init__(self) -> None:
        for name in ("empty_share", "tumour_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"sampling.{name}={getattr(self, name)}: must be within 0..1")
        if self.empty_share + self.tumour_share > 1.0:
            raise ConfigError(
                f"sampling.empty_share + tumour_share = {self.empty_share + self.tumour_share}: must be "
                "<= 1 (the rest goes to brain slices without tumour)"
            )
        if not 0.0 <= self.min_brain_fraction < 1.0:
            raise ConfigError(f"sampling.min_brain_fraction={self.min_brain_fraction}: must be in [0, 1)")


@dataclass(frozen=True)
class CodebookConfig:
    """Codebook health (our addition; the paper has none).

    restart_threshold: dead-code restarts of both EMA quantisers (``FP32EMAQuantizer``): after each EMA
    update, a code whose share of the EMA cluster mass is below ``restart_threshold`` times the uniform
    share 1/K is moved onto an encoder output of the batch (k-means++ seeding). 0 = off (the paper).
    """

    restart_threshold: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.restart_threshold < 1.0:
            raise ConfigError(
                f"codebook.restart_threshold={self.restart_threshold}: must be in [0, 1) (a share of the "
                "uniform usage 1/K; 0 = no restarts)"
            )


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule of the generator (the critic keeps ``optimizer.critic_lr``).

    kind ``constant`` (the paper): ``optimizer.lr`` throughout. ``cosine``: cosine decay from
    ``optimizer.lr`` to ``min_lr_ratio * optimizer.lr`` at the run's last step (``run.max_steps`` or
    ``run.epochs``; a ``--max-steps`` override moves the end). warmup_steps: a linear warm-up from
    ``lr / warmup_steps`` to ``lr`` over the first steps (either kind; 0 = none). The rate is a function of
    the step alone, so a resumed run continues on the same curve.
    """

    kind: Literal["constant", "cosine"]
    warmup_steps: int
    min_lr_ratio: float

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps={self.warmup_steps}: must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio={self.min_lr_ratio}: must be within 0..1")


#: The sections added after the first checkpoints were written, with the values that reproduce how those
#: runs trained (``upgrade_config_dict`` fills them into old checkpoints' configs, never into config files).
LEGACY_SECTIONS: dict[str, dict[str, Any]] = {
    "sampling": {"mode": "uniform", "empty_share": 0.05, "tumour_share": 0.4, "min_brain_fraction": 0.05},
    "codebook": {"restart_threshold": 0.0},
    "schedule": {"kind": "constant", "warmup_steps": 0, "min_lr_ratio": 1.0},
}


def upgrade_config_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config dict with the sections it predates added (``LEGACY_SECTIONS``); a copy."""
    out = dict(d)
    for section, values in LEGACY_SECTIONS.items():
        out.setdefault(section, dict(values))
    return out


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved (resolved) beside every checkpoint."""

    run: RunConfig
    save: SaveConfig
    dataset: DatasetConfig
    sampling: SamplingConfig
    preprocess: PreprocessConfig
    model: FDNConfig
    codebook: CodebookConfig
    loss: LossConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig

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
    """Name -> path of every YAML config shipped in ``training/fdn_training/configs``."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}
