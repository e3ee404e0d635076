"""Training of the feature decomposing network: resumable, seeded, single process or multi-GPU DDP.

One process (CPU, one GPU or Apple MPS)::

    fdn train --config demo_cpu --data COHORT --out RUN [--device auto|cuda|cpu|mps]
              [--resume] [--max-steps N] [--max-minutes M] [--cache DIR]

Several GPUs on one machine (DistributedDataParallel, one process per GPU, NCCL; gloo when on CPU)::

    torchrun --standalone --nproc_per_node=4 -m fdn_training.train \\
        --config training/fdn_training/configs/fdn8x8_256.yaml --data BRATS --out RUN

(``torchrun --standalone --nproc_per_node=4 "$(which fdn)" train ...`` works too: the entry point reads
WORLD_SIZE / RANK / LOCAL_RANK.) ``dataset.batch_size`` is the global batch, split evenly over the
processes; only rank 0 logs, writes checkpoints and exports the bundle.

What a run directory holds: ``config.yaml`` (the resolved config), ``checkpoints/{last,best}.pt`` each with
its config beside it (``last.yaml``/``best.yaml``), ``train_log.csv`` (losses, learning rate, codebook usage
and perplexity, dead-code restarts, share of empty slices) and ``val_log.csv``, ``tensorboard/``,
``cache/`` (the preprocessed-slice cache unless ``--cache`` is given) and, at the end, ``bundle/`` (the
inference bundle exported from the best checkpoint, its metadata holding the codebook usage of the last
full epoch and the training cases' fingerprints).

``--max-minutes`` is a wall-clock budget of training, counted from the first step (once the slice cache
is built and the run set up; the last validation and the export come after it). After timing its first
steps the run plans its last step to fit the budget (``Trainer``: the learning-rate schedule then ends with
the budget; ``run.max_steps`` / ``--max-steps`` / ``run.epochs`` still cap it) and saves that plan in its
checkpoints. Should the machine slow down, the run stops after the step that passes the budget,
validates, saves ``last.pt`` and exports as at a normal end (a later ``--resume`` continues it).

Determinism: every random number derives from ``run.seed``. The slice order of an epoch is a
DistributedSampler permutation seeded by (seed, epoch); the augmentation of one slice is seeded by
(seed, epoch, slice) inside SliceDataset (whatever worker loads it); the global python / numpy / torch
generators are seeded once per process from (seed, rank), and every checkpoint holds every rank's RNG
states, which a resumed run restores. So a run resumed from a checkpoint continues bit for bit as if it had
not stopped (on CPU; on GPUs up to the non-determinism of cuDNN kernels).

This module sets a run up and drives it; the parts live beside it: ``trainer`` (the Trainer: steps,
epochs, validation), ``data`` (slice cache, split, batch order), ``build`` (model, optimisers),
``checkpoint`` (save / load / resolve / export), ``distributed`` (process group, collectives, the DDP
wrapper of the generator), ``runlog`` (CSV, TensorBoard, progress bar) and ``rng`` (seeds, RNG states).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fdn_core.errors import ConfigError, DataError, FDNError
from fdn_core.fileio import atomic_write_bytes
from fdn_core.losses import FDNLoss
from fdn_core.model import FDN
from fdn_core.progress import Progress
from fdn_training.build import build_model, make_optimizers
from fdn_training.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpointer,
    config_yaml,
    export_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
)
from fdn_training.data import ResumableBatchSampler, TrainData, local_batch_size, prepare_data
from fdn_training.distributed import DistInfo, barrier, setup_distributed, teardown_distributed
from fdn_training.rng import derive_seed, seed_everything
from fdn_training.rundata import case_list_record, check_resume_data, record_run_data
from fdn_training.runlog import RunLogger
from fdn_training.trainconfig import TrainConfig, load_train_config
from fdn_training.trainer import Trainer, train_step

__all__ = [
    "CHECKPOINT_FORMAT",
    "DistInfo",
    "ResumableBatchSampler",
    "TrainResult",
    "Trainer",
    "build_model",
    "export_checkpoint",
    "load_checkpoint",
    "main",
    "make_optimizers",
    "resolve_checkpoint",
    "run_from_args",
    "train",
    "train_step",
]

log = logging.getLogger("fdn_training.train")


@dataclass
class TrainResult:
    """What a finished run produced (``model``: the trained FDN in memory, in its last state)."""

    run_dir: Path
    steps: int
    epochs_completed: int
    last_checkpoint: Path
    best_checkpoint: Path | None
    best_metric: str
    best_value: float | None
    bundle_dir: Path | None
    last_losses: dict[str, float]
    model: FDN
    stopped_by_time: bool = False


def train(
    config: TrainConfig | str | Path | None,
    data_dir: str | Path,
    run_dir: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    max_steps: int | None = None,
    cache_dir: str | Path | None = None,
    export_bundle: bool = True,
    progress: Progress | None = None,
    show_progress_bar: bool = True,
    init_from: str | Path | None = None,
    max_minutes: float | None = None,
    allow_data_change: bool = False,
) -> TrainResult:
    """Train (or with ``resume`` continue) an FDN run in ``run_dir`` on the cohort in ``data_dir``.

    ``config`` may be None when resuming (the run's own config is used); ``max_steps`` overrides
    ``run.max_steps``. ``init_from`` warm-starts a new run from another run's checkpoint (network, codebooks
    and critic weights; fresh optimisers, schedule and logs). ``max_minutes``: wall-clock budget of the
    training steps (see the module docstring). Under torchrun (WORLD_SIZE > 1) this joins the process
    group itself. A resumed run whose ``data_dir`` holds another case list than the one it started on
    (``RUN/data.json``) is refused unless ``allow_data_change``.
    """
    if max_minutes is not None and not max_minutes > 0:
        raise ConfigError(f"max_minutes={max_minutes}: must be > 0 (or None for no wall-clock budget)")
    dist, dev = setup_distributed(device)
    request = _Request(
        data_dir=Path(data_dir),
        run_dir=Path(run_dir),
        resume=resume,
        max_steps=max_steps,
        cache_dir=Path(cache_dir) if cache_dir is not None else Path(run_dir) / "cache",
        export_bundle=export_bundle,
        progress=progress,
        show_progress_bar=show_progress_bar,
        init_from=init_from,
        max_minutes=max_minutes,
        allow_data_change=allow_data_change,
    )
    try:
        return _train(config, request, dev, dist)
    finally:
        teardown_distributed(dist)


@dataclass(frozen=True)
class _Request:
    """The arguments of ``train`` besides the config (see there)."""

    data_dir: Path
    run_dir: Path
    resume: bool
    max_steps: int | None
    cache_dir: Path
    export_bundle: bool
    progress: Progress | None
    show_progress_bar: bool
    init_from: str | Path | None
    max_minutes: float | None = None
    allow_data_change: bool = False


# ------------------------------------------------------------------------------------ config of a run
def _resolve_config(
    config: TrainConfig | str | Path | None, run_dir: Path, resume: bool, max_steps: int | None
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run's config and, when resuming, its last checkpoint; refuses mismatched or clobbering runs."""
    last = run_dir / "checkpoints" / "last.pt"
    payload = None
    if resume:
        if not last.exists():
            raise DataError(
                f"{run_dir}: --resume given but there is no checkpoint {last}; start without --resume"
            )
        payload = load_checkpoint(last)
        cfg = _resumed_config(config, load_train_config(payload["config"]), run_dir)
    else:
        if config is None:
            raise ConfigError(
                "no config given; pass --config (a YAML file or a shipped name such as demo_cpu)"
            )
        cfg = config if isinstance(config, TrainConfig) else load_train_config(config)
        if last.exists():
            raise ConfigError(
                f"{run_dir}: already holds a training run ({last}); pass --resume to continue it or choose "
                "another --out folder"
            )
    if max_steps is not None:
        cfg = cfg.with_max_steps(max_steps)
    return cfg, payload


def _resumed_config(
    config: TrainConfig | str | Path | None, saved: TrainConfig, run_dir: Path
) -> TrainConfig:
    """The config to resume with: the run's own, or the given one when it differs at most in run.max_steps."""
    if config is None:
        return saved
    cfg = config if isinstance(config, TrainConfig) else load_train_config(config)
    diff = _config_diff(_without_max_steps(cfg), _without_max_steps(saved))
    if diff:
        raise ConfigError(
            f"{run_dir}: the given config differs from the run's ({'; '.join(diff)}); resume with"
            " the run's own config (omit --config) or start a new run folder"
        )
    return cfg


def _without_max_steps(cfg: TrainConfig) -> dict[str, Any]:
    """The config as a dict without run.max_steps (which a resumed run may change)."""
    d = cfg.to_dict()
    return {**d, "run": {k: v for k, v in d["run"].items() if k != "max_steps"}}


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: b -> a`` for every (nested) key whose values differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {vb!r} -> {va!r}")
    return out


def _check_request(cfg: TrainConfig, payload: dict[str, Any] | None, req: _Request, dist: DistInfo) -> None:
    """Refuse combinations that cannot work, before anything is written."""
    if req.init_from is not None and req.resume:
        raise ConfigError(
            "--init-from starts a new run from another run's weights; it cannot be combined with --resume"
        )
    local_batch_size(cfg, dist)
    if payload is not None and int(payload["world_size"]) != dist.world_size:
        raise ConfigError(
            f"{req.run_dir}: the checkpoint was written by {payload['world_size']} process(es); resume "
            f"with the same number (now {dist.world_size}) so the data order continues exactly"
        )


# ------------------------------------------------------------------------------------------ the run
def _train(
    config: TrainConfig | str | Path | None, req: _Request, device: torch.device, dist: DistInfo
) -> TrainResult:
    """Set the run up (config, folders, data, trainer, logs), train it, export its bundle."""
    cfg, payload = _resolve_config(config, req.run_dir, req.resume, req.max_steps)
    _check_request(cfg, payload, req, dist)
    if payload is not None:
        check_resume_data(req.run_dir, req.data_dir, payload, req.allow_data_change, dist.is_main)
    if dist.is_main:
        (req.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(req.run_dir / "config.yaml", config_yaml(cfg.to_dict()))
        if payload is None:
            record_run_data(req.run_dir, case_list_record(req.data_dir))
    data = prepare_data(cfg, req.data_dir, req.cache_dir, dist, device, req.progress)
    total_steps = data.steps_per_epoch * cfg.run.epochs
    if cfg.run.max_steps is not None:
        total_steps = min(total_steps, cfg.run.max_steps)
    provenance = _provenance(req.data_dir, data.train_cases) if dist.is_main else {}
    checkpoints = Checkpointer(
        req.run_dir / "checkpoints", cfg, dist, data.train_cases, data.val_cases, provenance
    )
    trainer = _make_trainer(cfg, req, device, dist, checkpoints)
    trainer.logger = RunLogger(
        req.run_dir,
        dist=dist,
        log_every=cfg.run.log_every,
        total_steps=total_steps,
        tensorboard=cfg.run.tensorboard,
        resume_step=None if payload is None else int(payload["step"]),
        progress=req.progress,
        show_progress_bar=req.show_progress_bar,
    )
    _start_state(trainer, payload, req.run_dir)
    if dist.is_main:
        _log_start(trainer, data, total_steps, req.run_dir)
        _log_sampling(data)
    if req.max_minutes is not None:  # the budget counts from the first step (the slice cache is ready)
        trainer.deadline = time.perf_counter() + 60.0 * req.max_minutes
    trainer.fit(data, total_steps)
    trainer.logger.close()
    if dist.is_main and trainer.state.planned_steps is not None:
        log.info("the run was fitted to its budget: %d of %d steps", trainer.state.step, total_steps)
    barrier(dist)
    best, last = checkpoints.path("best"), checkpoints.path("last")
    bundle_dir = None
    if req.export_bundle and dist.is_main:
        bundle_dir = _export(best if best.exists() else last, req.run_dir / "bundle")
    barrier(dist)
    return TrainResult(
        run_dir=req.run_dir,
        steps=trainer.state.step,
        epochs_completed=trainer.state.epoch,
        last_checkpoint=last,
        best_checkpoint=best if best.exists() else None,
        best_metric=cfg.save.best_metric,
        best_value=trainer.state.best_value,
        bundle_dir=bundle_dir,
        last_losses=trainer.last_logs,
        model=trainer.model,
        stopped_by_time=trainer.stopped_by_time,
    )


#: Keys of a phantom cohort's cohort.json recorded with a run (what regenerates the same cohort).
_COHORT_KEYS = ("generator", "generator_version", "template", "seed", "n_cases", "n_healthy", "shape")


def _provenance(data_dir: Path, train_cases: list[str]) -> dict[str, Any]:
    """What the run trained on: ``train_case_fingerprints`` (case id -> sha256 of its four image files, in
    the order of ``train_cases``) and, for a phantom cohort, ``cohort`` (seed and generator of its
    cohort.json). A case that cannot be fingerprinted leaves the fingerprints out, with a warning."""
    from fdn_core.data.provenance import FINGERPRINTS_KEY, TRAIN_COHORT_SEED_KEY, case_fingerprint
    from fdn_core.data.readers import find_cases

    out: dict[str, Any] = {}
    by_id = {c.case_id: c for c in find_cases(data_dir)}
    try:
        out[FINGERPRINTS_KEY] = {cid: case_fingerprint(by_id[cid]) for cid in train_cases}
    except (DataError, KeyError) as exc:
        log.warning("training cases not fingerprinted (%s); the bundle will record their ids only", exc)
    path = data_dir / "cohort.json"
    if path.is_file():
        try:
            cohort = json.loads(path.read_text(encoding="utf-8"))
            out["cohort"] = {k: cohort[k] for k in _COHORT_KEYS if k in cohort}
            if "seed" in cohort:
                out[TRAIN_COHORT_SEED_KEY] = int(cohort["seed"])
        except (OSError, ValueError, TypeError) as exc:
            log.warning("%s: unreadable (%s); the cohort's seed is not recorded", path, exc)
    return out


def _make_trainer(
    cfg: TrainConfig, req: _Request, device: torch.device, dist: DistInfo, checkpoints: Checkpointer
) -> Trainer:
    """Model (identical initialisation on every rank), optional warm start, losses, optimisers, Trainer."""
    model = build_model(cfg, device)
    if req.init_from is not None:
        warm = load_checkpoint(req.init_from)
        if load_train_config(warm["config"]).model != cfg.model:
            raise ConfigError(
                f"{req.init_from}: its model section differs from this config's; a warm start needs the same "
                "architecture (copy the model section of the checkpoint's config)"
            )
        model.load_state_dict(warm["model"])
        log.info("warm start from %s (step %s); fresh optimisers and schedule", req.init_from, warm["step"])
    loss_fn = FDNLoss(cfg.loss, latent_size=cfg.model.latent_size).to(device)
    opt_g, opt_c = make_optimizers(cfg, model)
    return Trainer(cfg, model, loss_fn, opt_g, opt_c, device, dist, checkpoints=checkpoints)


def _start_state(trainer: Trainer, payload: dict[str, Any] | None, run_dir: Path) -> None:
    """Seed the RNGs of a new run, or restore a resumed run's state (RNG states included).

    The last thing before training: nothing may draw random numbers in between.
    """
    dist = trainer.dist
    if payload is None:
        seed_everything(derive_seed(trainer.cfg.run.seed, dist.rank))
        return
    trainer.load_state_dict(payload)
    if dist.is_main:
        s = trainer.state
        log.info("resumed %s at step %d (epoch %d, batch %d)", run_dir, s.step, s.epoch, s.batch_in_epoch)


def _log_start(trainer: Trainer, data: TrainData, total_steps: int, run_dir: Path) -> None:
    """One line about the run (rank 0), or a warning when it has nothing left to do."""
    log.info(
        "training on %s x%d: %d train / %d val cases, %d train slices, %d steps per epoch, %d steps",
        trainer.device,
        trainer.dist.world_size,
        len(data.train_cases),
        len(data.val_cases),
        len(data.train_set),
        data.steps_per_epoch,
        total_steps,
    )
    if trainer.state.step >= total_steps:
        log.warning(
            "%s: already at step %d of %d; pass --max-steps (or raise run.epochs) to train further",
            run_dir,
            trainer.state.step,
            total_steps,
        )


def _log_sampling(data: TrainData) -> None:
    """One line: the share of draws going to empty / brain / tumour slices, uniform vs this run's."""
    info = data.sampling
    if not info:
        return
    uni, exp = info["uniform_shares"], info["expected_shares"]
    log.info(
        "sampling (%s): empty / brain / tumour slices are %.0f %% / %.0f %% / %.0f %% of the %d training "
        "slices; expected share of draws %.0f %% / %.0f %% / %.0f %%",
        info["mode"],
        100 * uni["empty"],
        100 * uni["brain"],
        100 * uni["tumour"],
        info["slices"],
        100 * exp["empty"],
        100 * exp["brain"],
        100 * exp["tumour"],
    )


def _export(source: Path, out_dir: Path) -> Path:
    """Export the inference bundle of checkpoint ``source`` to ``out_dir`` (RUN/bundle), replacing it."""
    bundle_dir = export_checkpoint(source, out_dir, overwrite=True)
    log.info("exported the inference bundle of %s to %s", source.name, bundle_dir)
    return bundle_dir


# ------------------------------------------------------------------------------------------------- CLI
def run_from_args(args: argparse.Namespace) -> int:
    """Run training for parsed ``fdn train`` arguments; prints a summary (rank 0). Returns 0."""
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps {args.max_steps}: must be >= 1")
    max_minutes = getattr(args, "max_minutes", None)
    if max_minutes is not None and not max_minutes > 0:
        raise ConfigError(f"--max-minutes {max_minutes}: must be > 0")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    result = train(
        args.config,
        args.data,
        args.out,
        device=args.device,
        resume=args.resume,
        max_steps=args.max_steps,
        cache_dir=args.cache,
        export_bundle=not args.no_export,
        show_progress_bar=not args.no_progress,
        init_from=args.init_from,
        max_minutes=max_minutes,
        allow_data_change=getattr(args, "allow_data_change", False),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        best = "none" if result.best_value is None else f"{result.best_value:.5g} ({result.best_metric})"
        budget = " (stopped at the --max-minutes budget)" if result.stopped_by_time else ""
        print(
            f"trained {result.steps} steps ({result.epochs_completed} full epochs){budget}; "
            f"best validation {best}"
        )
        print(f"checkpoints: {result.last_checkpoint.parent}")
        if result.bundle_dir is not None:
            print(f"inference bundle: {result.bundle_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fdn_training.train`` (what torchrun launches); same arguments as ``fdn train``."""
    from fdn_training.commands.train import add_train_arguments

    parser = argparse.ArgumentParser(prog="python -m fdn_training.train", description=__doc__.split("\n")[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_from_args(args)
    except FDNError as exc:
        print(f"fdn train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
