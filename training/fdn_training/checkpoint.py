"""Training checkpoints: writing (atomically, config beside), loading (``weights_only=True``), finding one
in a run folder, and exporting one as the inference bundle.

A checkpoint is a dict of tensors and plain types: ``format``, ``config`` (the resolved TrainConfig as a
dict), ``model``, ``optimizer`` / ``critic_optimizer`` (state dicts), ``step``, ``epoch``,
``batch_in_epoch``, ``world_size``, ``best`` (metric, value, step), ``rng`` (a list of every rank's RNG
states, see ``fdn_training.rng``), ``code_usage`` (``fdn_training.usage``: selection counts of both
codebooks), ``train_cases`` and ``val_cases``, and ``provenance`` (``train_case_fingerprints``: case id ->
sha256 of its four image files; ``cohort``: seed and generator of a phantom cohort's cohort.json).

``export_checkpoint`` records in the bundle metadata, beside the training config and the case lists,
``code_usage`` (the counts of the last full epoch; see ``fdn_training.usage.recorded_usage``) and the
provenance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from fdn_core.errors import ConfigError, DataError
from fdn_core.fileio import atomic_path, atomic_write_bytes
from fdn_training.build import build_model
from fdn_training.distributed import DistInfo, gather_objects
from fdn_training.trainconfig import TrainConfig, load_train_config, upgrade_config_dict
from fdn_training.usage import recorded_usage

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpointer",
    "config_yaml",
    "export_checkpoint",
    "load_checkpoint",
    "rank_rng_state",
    "resolve_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "fdn-train-checkpoint/1"


def config_yaml(cfg_dict: dict[str, Any]) -> bytes:
    """A config dict as YAML bytes (keys in their order)."""
    text: str = yaml.safe_dump(cfg_dict, sort_keys=False)
    return text.encode("utf-8")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically, with its resolved config beside it (``<name>.yaml``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)  # through a Python file: a full disk is an OSError, not torch's RuntimeError
    atomic_write_bytes(path.with_suffix(".yaml"), config_yaml(payload["config"]))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint (tensors and plain types only: ``torch.load(weights_only=True)``).

    The config of a checkpoint written before the sampling / codebook / schedule sections existed gets
    them with the values those runs trained with (``upgrade_config_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found; check the run folder (checkpoints/last.pt, best.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"{path}: not a readable training checkpoint ({exc}); it is truncated or not a checkpoint: give "
            "a run's checkpoints/last.pt or best.pt (fdn train), or copy the file again"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not an fdn training checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if isinstance(payload.get("config"), dict):
        payload["config"] = upgrade_config_dict(payload["config"])
    return payload


def rank_rng_state(payload: dict[str, Any], rank: int) -> dict[str, Any]:
    """The RNG states that ``rank`` saved in a checkpoint (older checkpoints hold one dict for all ranks)."""
    rng = payload["rng"]
    return rng if isinstance(rng, dict) else rng[rank]


def resolve_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """``best`` / ``last`` checkpoint of a run folder (best falls back to last), or a checkpoint path."""
    run_dir = Path(run_dir)
    if which in ("best", "last"):
        path = run_dir / "checkpoints" / f"{which}.pt"
        if which == "best" and not path.exists():
            path = run_dir / "checkpoints" / "last.pt"
        if not path.exists():
            raise DataError(
                f"{run_dir}: no checkpoint {which}.pt in {run_dir / 'checkpoints'}; is this a run folder?"
            )
        return path
    path = Path(which)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint file not found; pass best, last or a .pt path")
    return path


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    extra_metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the inference bundle (``save_bundle``) of a training checkpoint to ``out_dir``."""
    from fdn_core.model.bundle import load_bundle, save_bundle
    from fdn_core.retrieval import save_bundle_hamming_codes

    checkpoint = Path(checkpoint)
    payload = load_checkpoint(checkpoint)
    cfg = load_train_config(payload["config"])
    model = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(payload["model"])
    model.eval()
    metadata = {
        "source_checkpoint": checkpoint.name,
        "step": int(payload["step"]),
        "epoch": int(payload["epoch"]),
        "best_metric": payload["best"]["metric"],
        "best_value": payload["best"]["value"],
        "train_config": payload["config"],
        "train_cases": list(payload["train_cases"]),
        "val_cases": list(payload["val_cases"]),
        **dict(payload.get("provenance") or {}),
        **(extra_metadata or {}),
    }
    if "code_usage" in payload:
        metadata["code_usage"] = recorded_usage(payload["code_usage"])
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir}: already exists; choose another output folder (or --overwrite)")
    bundle_dir = save_bundle(model, cfg.preprocess, out_dir, metadata, overwrite=overwrite)
    # The binary codes depend on the codebooks only: fit them once here, so databases reuse them.
    save_bundle_hamming_codes(load_bundle(bundle_dir, "cpu"))
    return bundle_dir


class Checkpointer:
    """Writes ``best.pt`` / ``last.pt`` of a run: the trainer's state plus what describes the run.

    Every rank calls ``save`` (each contributes its RNG states); rank 0 alone writes.
    """

    def __init__(
        self,
        ckpt_dir: Path,
        cfg: TrainConfig,
        dist: DistInfo,
        train_cases: list[str],
        val_cases: list[str],
        provenance: dict[str, Any] | None = None,
    ) -> None:
        self.ckpt_dir, self.cfg, self.dist = ckpt_dir, cfg, dist
        self.train_cases, self.val_cases = list(train_cases), list(val_cases)
        self.provenance = dict(provenance or {})

    def path(self, name: str) -> Path:
        """``checkpoints/<name>.pt`` of the run."""
        return self.ckpt_dir / f"{name}.pt"

    def save(self, name: str, state: dict[str, Any]) -> None:
        """Save ``state`` (``Trainer.state_dict()``, with this rank's ``rng``) as ``<name>.pt``."""
        rng = gather_objects(state["rng"], self.dist)
        if not self.dist.is_main:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            **state,
            "world_size": self.dist.world_size,
            "rng": rng,
            "train_cases": self.train_cases,
            "val_cases": self.val_cases,
            "provenance": self.provenance,
        }
        save_checkpoint(self.path(name), payload)
