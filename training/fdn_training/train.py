"""Training loop of the feature decomposing network: resumable, seeded, single process or multi-GPU DDP.

One process (CPU, one GPU or Apple MPS)::

    fdn train --config training/configs/demo_cpu.yaml --data COHORT --out RUN [--device auto|cuda|cpu|mps]
              [--resume] [--max-steps N] [--cache DIR]

Several GPUs on one machine (DistributedDataParallel, one process per GPU, NCCL; gloo when on CPU)::

    torchrun --standalone --nproc_per_node=4 -m fdn_training.train \\
        --config training/configs/fdn8x8_256.yaml --data BRATS --out RUN

(``torchrun --standalone --nproc_per_node=4 "$(which fdn)" train ...`` works too: the entry point reads
WORLD_SIZE / RANK / LOCAL_RANK.) ``dataset.batch_size`` is the global batch, split evenly over the
processes; only rank 0 logs, writes checkpoints and exports the bundle.

What a run directory holds: ``config.yaml`` (the resolved config), ``checkpoints/{last,best}.pt`` each with
its config beside it (``last.yaml``/``best.yaml``), ``train_log.csv`` and ``val_log.csv``, ``tensorboard/``,
``cache/`` (the preprocessed-slice cache unless ``--cache`` is given) and, at the end, ``bundle/`` (the
inference bundle exported from the best checkpoint).

Determinism: every random number derives from ``run.seed``. The slice order of an epoch is a
DistributedSampler permutation seeded by (seed, epoch); the augmentation of one slice is seeded by
(seed, epoch, slice) inside SliceDataset (whatever worker loads it); the global torch RNG is reseeded
by (seed, step, rank) before every step. So a run resumed from a checkpoint continues bit for bit as if
it had not stopped (on CPU; on GPUs up to the non-determinism of cuDNN kernels). Checkpoints also carry
the python / numpy / torch RNG states.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from fdn_core.device import autocast_for, select_device
from fdn_core.errors import ConfigError, DataError, FDNError
from fdn_core.evaluation.metrics import dice_from_counts, overlap_counts
from fdn_core.fileio import atomic_path, atomic_write_bytes
from fdn_core.labels import ABNORMAL_CLASSES
from fdn_core.losses import FDNLoss, abnormal_flags
from fdn_core.model import FDN
from fdn_core.progress import Progress
from fdn_training.trainconfig import TrainConfig, load_train_config

__all__ = [
    "CHECKPOINT_FORMAT",
    "DistInfo",
    "ResumableBatchSampler",
    "TrainResult",
    "build_model",
    "export_checkpoint",
    "load_checkpoint",
    "main",
    "resolve_checkpoint",
    "run_from_args",
    "train",
    "train_step",
]

log = logging.getLogger("fdn_training.train")

CHECKPOINT_FORMAT = "fdn-train-checkpoint/1"
#: Training stops with an error after this many generator steps in a row with non-finite gradients.
MAX_CONSECUTIVE_SKIPS = 25


# ----------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    """Process-group facts of this process (world_size 1 when not distributed)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_arg: str) -> tuple[DistInfo, torch.device]:
    """Read torchrun's WORLD_SIZE / RANK / LOCAL_RANK; join the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), select_device(device_arg)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    choice = (device_arg or "auto").lower()
    if choice == "mps":
        raise ConfigError(
            "multi-process training (WORLD_SIZE > 1) supports CUDA (nccl) and CPU (gloo), not MPS"
        )
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = select_device(choice if choice.startswith("cuda") or choice == "cpu" else "cpu")
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank)
    return DistInfo(world, rank, local_rank), device


def _barrier(dist: DistInfo) -> None:
    if dist.distributed:
        torch_dist.barrier()


def _all_reduce_sum(values: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    if dist.distributed:
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
    return values


def _average_gradients(params: list[nn.Parameter], dist: DistInfo, divisor: float) -> None:
    """All-reduce the gradients of ``params`` in one flat buffer, then divide by ``divisor``."""
    if not dist.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    flat /= divisor
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


# ------------------------------------------------------------------------------------------------ seeds
def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence hashing: no correlated streams)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    """Seed python/numpy in each DataLoader worker from its torch seed (the loader's generator sets it)."""
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)


def _rng_state() -> dict[str, Any]:
    """python / numpy / torch (and CUDA) RNG states as tensors and ints, loadable with weights_only=True."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state((nps["name"], keys, nps["pos"], nps["has_gauss"], nps["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- data
class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of one epoch from a DistributedSampler permutation, able to start mid-epoch.

    The permutation depends on (seed, epoch) only, so a resumed run sees the same batches. Incomplete last
    batches are dropped (the image decoder's batch norm and distribution matching need
    several slices). ``set_epoch(epoch, skip_batches)`` selects the epoch and how many batches to skip.
    """

    def __init__(self, n_items: int, batch_size: int, dist: DistInfo, seed: int) -> None:
        self.batch_size = batch_size
        self.sampler = DistributedSampler(
            range(n_items),
            num_replicas=dist.world_size,
            rank=dist.rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.epoch = 0
        self.skip = 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler) // self.batch_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        for b in range(self.skip, self.batches_per_epoch):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.skip, 0)


def _prepare_data(
    cfg: TrainConfig, data_dir: Path, cache_dir: Path, dist: DistInfo, progress: Progress | None
):
    """Open (building if needed) the slice cache and split its cases; rank 0 builds, the others wait."""
    from fdn_core.data.cache import SliceCache
    from fdn_core.data.dataset import SliceDataset, split_cases

    if dist.is_main:
        cache = SliceCache.build_or_open(data_dir, cache_dir, cfg.preprocess, progress=progress)
    _barrier(dist)
    if not dist.is_main:
        cache = SliceCache.build_or_open(data_dir, cache_dir, cfg.preprocess)
    case_ids = list(cache.case_ids)
    if len(case_ids) < 2:
        raise DataError(
            f"{data_dir}: {len(case_ids)} case(s) found; training needs at least 2 (one for validation). "
            "Point --data at a cohort folder (fdn phantom makes one)"
        )
    train_ids, val_ids = split_cases(
        case_ids, (1.0 - cfg.dataset.val_fraction, cfg.dataset.val_fraction), cfg.dataset.split_seed
    )
    if not train_ids or not val_ids:
        raise DataError(
            f"{data_dir}: the case-wise split of {len(case_ids)} cases with dataset.val_fraction="
            f"{cfg.dataset.val_fraction} left an empty side; use more cases or another val_fraction"
        )
    train_set = SliceDataset(cache, train_ids, augment=cfg.dataset.augment, seed=cfg.run.seed)
    val_set = SliceDataset(cache, val_ids, augment=False)
    return cache, list(train_ids), list(val_ids), train_set, val_set


def _val_indices(n: int, max_slices: int, dist: DistInfo) -> list[int]:
    """Evenly spread validation indices (at most ``max_slices``), sharded over the processes."""
    if max_slices and n > max_slices:
        chosen = np.unique(np.linspace(0, n - 1, max_slices).round().astype(int)).tolist()
    else:
        chosen = list(range(n))
    return chosen[dist.rank :: dist.world_size]


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg: TrainConfig, device: torch.device, seed: int | None = None) -> FDN:
    """The FDN of ``cfg.model``, initialised from ``seed`` (default ``run.seed``), on ``device``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed if seed is None else seed)
        model = FDN(cfg.model)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _make_optimizers(cfg: TrainConfig, model: FDN) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    o = cfg.optimizer
    opt_g = torch.optim.Adam(
        list(model.generator_parameters()), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay
    )
    opt_c = torch.optim.Adam(
        list(model.critic_parameters()),
        lr=o.critic_lr,
        betas=o.critic_betas,
        weight_decay=o.critic_weight_decay,
    )
    return opt_g, opt_c


def _float_output(out: Any) -> Any:
    """The model output with every floating tensor cast to float32 (losses run outside autocast)."""
    changes = {}
    for f in dataclasses.fields(out):
        v = getattr(out, f.name)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float32:
            changes[f.name] = v.float()
    return dataclasses.replace(out, **changes) if changes else out


def _move_batch(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    non_blocking = device.type == "cuda"
    x = batch["image"].to(device, non_blocking=non_blocking)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    seg = batch["seg"].to(device, non_blocking=non_blocking)
    return x, seg


def train_step(
    cfg: TrainConfig,
    model: FDN,
    forward_model: nn.Module,
    loss_fn: FDNLoss,
    opt_g: torch.optim.Optimizer,
    opt_c: torch.optim.Optimizer,
    batch: dict[str, Any],
    device: torch.device,
    dist: DistInfo = DistInfo(),
) -> dict[str, float]:
    """One generator step, preceded by ``optimizer.critic_steps`` critic steps when DM is on.

    ``forward_model`` is ``model`` or its DistributedDataParallel wrapper. The forward pass runs under
    autocast (bf16 on CUDA); the losses run in float32. Returns the loss terms as floats, plus
    ``grad_norm`` (before clipping) and ``skipped`` (1.0 when a non-finite gradient was not applied).
    A non-finite loss raises FDNError.
    """
    x, seg = _move_batch(batch, device)
    model.train()
    with autocast_for(device):
        out = forward_model(x)
    out = _float_output(out)
    logs: dict[str, float] = {}
    critic_params = list(model.critic_parameters())
    flags = abnormal_flags(seg)
    if loss_fn.distribution_matching:
        z_detached = out.z_q_normal.detach()
        for _ in range(cfg.optimizer.critic_steps):
            c_loss, c_terms = loss_fn.critic(model.critic, z_detached, flags)
            active = _all_reduce_sum(torch.tensor([c_terms["dm_active"]]), dist)
            if float(active[0]) == 0.0:
                break  # no process has both healthy and diseased slices: nothing to learn from
            opt_c.zero_grad(set_to_none=True)
            c_loss.backward()  # zero gradients on a process without both kinds of slices
            _average_gradients(critic_params, dist, divisor=float(active[0]))
            opt_c.step()
        logs.update({k: v for k, v in c_terms.items() if k != "dm_active"})
    for p in critic_params:
        p.requires_grad_(False)  # the generator term flows through the critic into the codes only
    try:
        total, terms = loss_fn.generator(out, x, seg, critic=model.critic, abnormal=flags)
        opt_g.zero_grad(set_to_none=True)
        total.backward()
    finally:
        for p in critic_params:
            p.requires_grad_(True)
    logs.update(terms)
    if not all(math.isfinite(v) for v in logs.values()):
        raise FDNError(
            f"training diverged: non-finite loss {logs}; lower optimizer.lr, set optimizer.grad_clip "
            "or check the input data for NaNs"
        )
    # The global gradient norm is always computed (and clipped when optimizer.grad_clip is set). A step
    # whose gradient is not finite is skipped, as torch.amp's GradScaler does: applying it would turn
    # every weight into NaN. The caller counts skipped steps and gives up when they keep coming.
    params = list(model.generator_parameters())
    clip = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip is not None else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip, error_if_nonfinite=False))
    logs["grad_norm"] = norm
    if math.isfinite(norm):
        opt_g.step()
        logs["skipped"] = 0.0
    else:
        opt_g.zero_grad(set_to_none=True)
        logs["skipped"] = 1.0
    return logs


@torch.no_grad()
def _validate(
    model: FDN,
    loss_fn: FDNLoss,
    dataset: Dataset,
    indices: list[int],
    batch_size: int,
    device: torch.device,
    dist: DistInfo,
) -> dict[str, float]:
    """Validation loss (generator loss without the adversarial term) and pooled Dice of the abnormal classes.
    Sums are all-reduced over the processes, so every rank gets the same numbers.
    """
    from torch.utils.data import Subset

    model.eval()
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=0)
    sums: dict[str, float] = {}
    overlap = np.zeros((3, len(ABNORMAL_CLASSES)), dtype=np.int64)  # intersection, predicted, reference
    count = 0
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            x, seg = _move_batch(batch, device)
            with autocast_for(device):
                out = model(x)
            out = _float_output(out)
            total, terms = loss_fn.generator(out, x, seg, critic=None)
            b = x.shape[0]
            count += b
            for k, v in {**terms, "loss": float(total)}.items():
                if k in ("total", "reg", "dm_active"):
                    continue
                sums[k] = sums.get(k, 0.0) + float(v) * b
            pred = out.seg_logits.argmax(1)
            overlap += overlap_counts(pred.cpu().numpy(), seg.cpu().numpy(), ABNORMAL_CLASSES)
    keys = sorted(sums)
    packed = torch.tensor([count] + [sums[k] for k in keys], dtype=torch.float64)
    packed = _all_reduce_sum(packed, dist)
    pooled = _all_reduce_sum(torch.from_numpy(overlap).to(torch.float64), dist).numpy()
    n = max(float(packed[0]), 1.0)
    result = {f"val_{k}": float(packed[i + 1]) / n for i, k in enumerate(keys)}
    per_class = dice_from_counts(pooled)
    for name, d in zip(("ncr_net", "ed", "et"), per_class, strict=True):
        result[f"val_dice_{name}"] = float(d)
    present = per_class[~np.isnan(per_class)]
    result["val_dice"] = float(present.mean()) if present.size else float("nan")
    result["val_slices"] = n
    return result


# ------------------------------------------------------------------------------------------ checkpoints
def _config_yaml(cfg_dict: dict[str, Any]) -> bytes:
    return yaml.safe_dump(cfg_dict, sort_keys=False).encode("utf-8")


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically, with its resolved config beside it (``<name>.yaml``)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    atomic_write_bytes(path.with_suffix(".yaml"), _config_yaml(payload["config"]))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint (tensors and plain types only: ``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found; check the run folder (checkpoints/last.pt, best.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"{path}: not a readable training checkpoint ({exc}); it may be truncated") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not an fdn training checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return payload


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
    from fdn_core.model.bundle import save_bundle

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
        **(extra_metadata or {}),
    }
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir}: already exists; choose another output folder (or --overwrite)")
    return save_bundle(model, cfg.preprocess, out_dir, metadata, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------- logging
class _CsvLog:
    """Append-only CSV log. The header is the fixed fields plus the keys of the first row; on resume the
    existing header is kept and rows past the resumed step are dropped."""

    def __init__(self, path: Path, fields: list[str], resume_step: int | None) -> None:
        self.path, self.fields = path, list(fields)
        self.started = False
        if resume_step is not None and path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resume_step]
            if header:
                self.fields, self.started = header, True
                with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=header)
                    writer.writeheader()
                    writer.writerows(rows)
        elif path.exists():
            path.unlink()

    def write(self, row: dict[str, Any]) -> None:
        if not self.started:
            self.fields += sorted(k for k in row if k not in self.fields)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if not self.started:
                writer.writeheader()
                self.started = True
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _tensorboard(run_dir: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            "run.tensorboard is true but the tensorboard package is not installed; "
            "pip install tensorboard (extra 'train') or set run.tensorboard: false"
        ) from exc
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)


# -------------------------------------------------------------------------------------------- the loop
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


def _is_better(metric: str, value: float, best: float | None) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if metric == "val_loss" else value > best


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {vb!r} -> {va!r}")
    return out


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
) -> TrainResult:
    """Train (or with ``resume`` continue) an FDN run in ``run_dir`` on the cohort in ``data_dir``.

    ``config`` may be None when resuming (the run's own config is used); ``max_steps`` overrides
    ``run.max_steps``. ``init_from`` warm-starts a new run from another run's checkpoint (network, codebooks
    and critic weights; fresh optimisers, schedule and logs). Under torchrun (WORLD_SIZE > 1) this joins
    the process group itself.
    """
    dist, dev = _setup_distributed(device)
    try:
        return _train(
            config,
            Path(data_dir),
            Path(run_dir),
            dev,
            dist,
            resume,
            max_steps,
            cache_dir,
            export_bundle,
            progress,
            show_progress_bar,
            init_from,
        )
    finally:
        if dist.distributed and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _resolve_config(
    config: TrainConfig | str | Path | None, run_dir: Path, resume: bool, max_steps: int | None
):
    last = run_dir / "checkpoints" / "last.pt"
    payload = None
    if resume:
        if not last.exists():
            raise DataError(
                f"{run_dir}: --resume given but there is no checkpoint {last}; start without --resume"
            )
        payload = load_checkpoint(last)
        saved = load_train_config(payload["config"])
        if config is None:
            cfg = saved
        else:
            cfg = config if isinstance(config, TrainConfig) else load_train_config(config)
            ignore = {"max_steps"}
            a = {**cfg.to_dict(), "run": {k: v for k, v in cfg.to_dict()["run"].items() if k not in ignore}}
            b = {
                **saved.to_dict(),
                "run": {k: v for k, v in saved.to_dict()["run"].items() if k not in ignore},
            }
            diff = _config_diff(a, b)
            if diff:
                raise ConfigError(
                    f"{run_dir}: the given config differs from the run's ({'; '.join(diff)}); resume with"
                    " the run's own config (omit --config) or start a new run folder"
                )
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


def _train(
    config: TrainConfig | str | Path | None,
    data_dir: Path,
    run_dir: Path,
    device: torch.device,
    dist: DistInfo,
    resume: bool,
    max_steps: int | None,
    cache_dir: str | Path | None,
    export_bundle: bool,
    progress: Progress | None,
    show_progress_bar: bool,
    init_from: str | Path | None = None,
) -> TrainResult:
    cfg, payload = _resolve_config(config, run_dir, resume, max_steps)
    if init_from is not None and resume:
        raise ConfigError(
            "--init-from starts a new run from another run's weights; it cannot be combined with --resume"
        )
    if cfg.dataset.batch_size % dist.world_size:
        raise ConfigError(
            f"dataset.batch_size={cfg.dataset.batch_size} is not divisible by the {dist.world_size} "
            "processes; choose a batch size that is a multiple of --nproc_per_node"
        )
    local_batch = cfg.dataset.batch_size // dist.world_size
    ckpt_dir = run_dir / "checkpoints"
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.yaml", _config_yaml(cfg.to_dict()))
    cache_path = Path(cache_dir) if cache_dir is not None else run_dir / "cache"
    _, train_ids, val_ids, train_set, val_set = _prepare_data(cfg, data_dir, cache_path, dist, progress)

    # Model, optimisers, losses: identical initialisation on every rank (same seed).
    _seed_everything(cfg.run.seed)
    model = build_model(cfg, device)
    loss_fn = FDNLoss(cfg.loss, latent_size=cfg.model.latent_size).to(device)
    opt_g, opt_c = _make_optimizers(cfg, model)
    step, epoch, batch_in_epoch = 0, 0, 0
    metric = cfg.save.best_metric
    best_value: float | None = None
    best_step: int | None = None
    if init_from is not None:
        warm = load_checkpoint(init_from)
        warm_cfg = load_train_config(warm["config"])
        if warm_cfg.model != cfg.model:
            raise ConfigError(
                f"{init_from}: its model section differs from this config's; a warm start needs the same "
                "architecture (copy the model section of the checkpoint's config)"
            )
        model.load_state_dict(warm["model"])
        log.info("warm start from %s (step %s); fresh optimisers and schedule", init_from, warm["step"])
    if payload is not None:
        if int(payload["world_size"]) != dist.world_size:
            raise ConfigError(
                f"{run_dir}: the checkpoint was written by {payload['world_size']} process(es); resume "
                f"with the same number (now {dist.world_size}) so the data order continues exactly"
            )
        model.load_state_dict(payload["model"])
        opt_g.load_state_dict(payload["optimizer"])
        opt_c.load_state_dict(payload["critic_optimizer"])
        step, epoch, batch_in_epoch = (
            int(payload["step"]),
            int(payload["epoch"]),
            int(payload["batch_in_epoch"]),
        )
        best_value, best_step = payload["best"]["value"], payload["best"]["step"]
        _set_rng_state(payload["rng"])
        if dist.is_main:
            log.info("resumed %s at step %d (epoch %d, batch %d)", run_dir, step, epoch, batch_in_epoch)

    forward_model: nn.Module = model
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # The critic is trained by its own optimiser (gradients averaged by hand); DDP syncs the rest.
        ignore = [f"critic.{n}" for n, _ in model.critic.named_parameters()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        forward_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    sampler = ResumableBatchSampler(len(train_set), local_batch, dist, seed=cfg.run.seed)
    steps_per_epoch = sampler.batches_per_epoch
    if steps_per_epoch == 0:
        raise DataError(
            f"{data_dir}: {len(train_set)} training slices make no full batch of {cfg.dataset.batch_size}; "
            "lower dataset.batch_size or add cases"
        )
    total_steps = cfg.run.epochs * steps_per_epoch
    if cfg.run.max_steps is not None:
        total_steps = min(total_steps, cfg.run.max_steps)
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=cfg.run.num_workers,
        worker_init_fn=_worker_init,
        generator=torch.Generator().manual_seed(cfg.run.seed),
        pin_memory=device.type == "cuda",
    )
    val_idx = _val_indices(len(val_set), cfg.dataset.val_max_slices, dist)

    train_fields = ["step", "epoch", "elapsed_s", "slices_per_s", "total", "critic", "grad_norm"]
    val_fields = [
        "step",
        "epoch",
        "val_loss",
        "val_dice",
        "val_dice_ncr_net",
        "val_dice_ed",
        "val_dice_et",
        "is_best",
    ]
    train_csv = val_csv = writer = None
    bar = None
    if dist.is_main:
        resume_step = step if payload is not None else None
        writer = _tensorboard(run_dir, resume_step) if cfg.run.tensorboard else None
        log.info(
            "training on %s x%d: %d train / %d val cases, %d train slices, %d steps per epoch, %d steps",
            device,
            dist.world_size,
            len(train_ids),
            len(val_ids),
            len(train_set),
            steps_per_epoch,
            total_steps,
        )
        if show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)

    window: dict[str, list[float]] = {}
    t_start = time.perf_counter()
    t_window, n_window = time.perf_counter(), 0
    last_logs: dict[str, float] = {}
    best_path = ckpt_dir / "best.pt"
    last_path = ckpt_dir / "last.pt"

    def checkpoint_payload() -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "optimizer": opt_g.state_dict(),
            "critic_optimizer": opt_c.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "world_size": dist.world_size,
            "best": {"metric": metric, "value": best_value, "step": best_step},
            "rng": _rng_state(),
            "train_cases": list(train_ids),
            "val_cases": list(val_ids),
        }

    def validate_now() -> None:
        nonlocal best_value, best_step
        res = _validate(model, loss_fn, val_set, val_idx, local_batch, device, dist)
        value = res[metric]
        improved = _is_better(metric, value, best_value)
        if improved:
            best_value, best_step = value, step
        if dist.is_main:
            if improved:
                _save_checkpoint(best_path, checkpoint_payload())
            assert val_csv is not None
            val_csv.write({"step": step, "epoch": epoch, **res, "is_best": int(improved)})
            if writer is not None:
                for k, v in res.items():
                    writer.add_scalar(f"val/{k}", v, step)
            log.info("step %d validation: %s=%.5g%s", step, metric, value, " (best)" if improved else "")

    if dist.is_main:
        train_csv = _CsvLog(run_dir / "train_log.csv", train_fields, step if payload is not None else None)
        val_csv = _CsvLog(run_dir / "val_log.csv", val_fields, step if payload is not None else None)

    validated_at = -1
    skipped_total = skipped_run = 0
    if step >= total_steps and dist.is_main:
        log.warning(
            "%s: already at step %d of %d; pass --max-steps (or raise run.epochs) to train further",
            run_dir,
            step,
            total_steps,
        )
    while step < total_steps:
        sampler.set_epoch(epoch, batch_in_epoch)
        train_set.set_epoch(epoch)  # the augmentation draw of slice i is seeded by (seed, epoch, i)
        for batch in loader:
            torch.manual_seed(_derive_seed(cfg.run.seed, 104729, step, dist.rank))
            logs = train_step(cfg, model, forward_model, loss_fn, opt_g, opt_c, batch, device, dist)
            if logs["skipped"]:
                skipped_total += 1
                skipped_run += 1
                if dist.is_main and skipped_total in (1, 10, 100, 1000):
                    log.warning(
                        "step %d: non-finite gradient norm, generator update skipped (%d so far)",
                        step + 1,
                        skipped_total,
                    )
                if skipped_run >= MAX_CONSECUTIVE_SKIPS:
                    raise FDNError(
                        f"training diverged: {skipped_run} consecutive steps had non-finite gradients; "
                        "lower optimizer.lr, set optimizer.grad_clip or check the input data"
                    )
            else:
                skipped_run = 0
            step += 1
            batch_in_epoch += 1
            n_window += cfg.dataset.batch_size
            end_of_epoch = batch_in_epoch >= steps_per_epoch
            if end_of_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            last_logs = logs
            for k, v in logs.items():
                window.setdefault(k, []).append(v)
            if dist.is_main:
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        {k: f"{v:.4g}" for k, v in logs.items() if k in ("total", "rec", "seg", "critic")}
                    )
                if progress is not None:
                    progress.update(step, total_steps, "training")
                if step % cfg.run.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    row = {k: float(np.mean(v)) for k, v in window.items()}
                    row.update(
                        step=step,
                        epoch=epoch,
                        elapsed_s=now - t_start,
                        slices_per_s=n_window / (now - t_window),
                    )
                    assert train_csv is not None
                    train_csv.write(row)
                    if writer is not None:
                        for k, v in row.items():
                            if k not in ("step", "epoch"):
                                writer.add_scalar(f"train/{k}", v, step)
                    window, t_window, n_window = {}, now, 0
            elif progress is not None:
                progress.check()
            if (cfg.run.val_every and step % cfg.run.val_every == 0) or (
                not cfg.run.val_every and end_of_epoch
            ):
                validate_now()
                validated_at = step
            if dist.is_main and step % cfg.save.checkpoint_every == 0 and step < total_steps:
                _save_checkpoint(last_path, checkpoint_payload())
            if step >= total_steps or end_of_epoch:
                break
    if validated_at != step:
        validate_now()
    if skipped_total and dist.is_main:
        log.warning("%d generator step(s) had non-finite gradients and were skipped", skipped_total)
    if dist.is_main:
        _save_checkpoint(last_path, checkpoint_payload())
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    _barrier(dist)
    bundle_dir = None
    if export_bundle and dist.is_main:
        source = best_path if best_path.exists() else last_path
        bundle_dir = export_checkpoint(source, run_dir / "bundle", overwrite=True)
        log.info("exported the inference bundle of %s to %s", source.name, bundle_dir)
    _barrier(dist)
    return TrainResult(
        run_dir=run_dir,
        steps=step,
        epochs_completed=epoch,
        last_checkpoint=last_path,
        best_checkpoint=best_path if best_path.exists() else None,
        best_metric=metric,
        best_value=best_value,
        bundle_dir=bundle_dir,
        last_losses=last_logs,
        model=model,
    )


# ------------------------------------------------------------------------------------------------- CLI
def run_from_args(args: argparse.Namespace) -> int:
    """Run training for parsed ``fdn train`` arguments; prints a summary (rank 0). Returns 0."""
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps {args.max_steps}: must be >= 1")
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
    )
    if int(os.environ.get("RANK", "0")) == 0:
        best = "none" if result.best_value is None else f"{result.best_value:.5g} ({result.best_metric})"
        print(f"trained {result.steps} steps ({result.epochs_completed} full epochs); best validation {best}")
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
