"""The baselines' training loop: SimSiam (self-supervised, two MR views per slice) and Y-Net (segmentation,
classification and circle-loss hashing), one process, a step and a wall-clock budget.

A run folder holds ``config.yaml`` (the resolved config), ``train_log.csv`` (every ``log_every`` steps:
elapsed time, slices seen, learning rate, loss terms averaged since the previous row), ``val_log.csv`` (every
``val_every`` steps and at the end: slice-wise retrieval among the validation cases, mAP@10 and P@10 with
relevance = same lesion-class set and relative level within 0.05; SimSiam also the spread of its normalised
projections, 1 = healthy, 0 = collapsed), ``last/`` (a baseline bundle every ``checkpoint_every`` steps) and
``bundle/`` (the final bundle, with the training command, config, cohort seed, training-case fingerprints
and the budget in its metadata).

The learning rate follows a cosine from the base rate to 0 over the budget: the fraction of the budget used
is the larger of steps / max_steps and minutes / max_minutes, so a run stopped by the clock still ends at a
low rate.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from fdn_core.baselines.augment import MRViewAugment
from fdn_core.baselines.bundle import save_baseline
from fdn_core.baselines.losses import SimSiamLoss, YNetLoss
from fdn_core.baselines.simsiam import SimSiam
from fdn_core.baselines.ynet import YNet
from fdn_core.config import config_to_dict
from fdn_core.data.preprocess import PreprocessConfig
from fdn_core.errors import ConfigError
from fdn_core.evaluation.retrieval_eval import average_precision_at_k, precision_at_k
from fdn_core.progress import Progress
from fdn_training.baselines.config import SimSiamTrainConfig, YNetTrainConfig
from fdn_training.baselines.data import BaselineSlices, augment_with_labels, open_slices

__all__ = ["RunResult", "train_baseline", "validation_retrieval"]

TrainConfig = SimSiamTrainConfig | YNetTrainConfig


@dataclass
class RunResult:
    """What a finished run did: steps, slices seen, minutes, the final bundle and the last validation."""

    steps: int
    slices_seen: int
    minutes: float
    bundle: Path
    validation: dict[str, float]


class _Csv:
    """Append rows to a CSV file whose header is fixed by the first row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fields: list[str] | None = None
        path.unlink(missing_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        if self.fields is None:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def validation_retrieval(
    features: np.ndarray,
    metric: str,
    class_set: np.ndarray,
    level: np.ndarray,
    case: np.ndarray,
    k: int = 10,
    tolerance: float = 0.05,
) -> dict[str, float]:
    """Slice-wise retrieval among validation slices: every slice with a lesion queries the slices of the other
    cases; relevant = same lesion-class set and |level difference| <= ``tolerance``. Returns mAP@k and P@k
    (``fdn_core.evaluation.retrieval_eval`` definitions) and the number of queries."""
    if metric == "hamming":
        bits = features.astype(bool)
        dist = (bits[:, None, :] != bits[None, :, :]).sum(axis=2).astype(np.float64)
    elif metric == "cosine":
        f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        dist = 1.0 - f @ f.T
    else:
        raise ConfigError(f"unknown metric {metric!r}")
    aps, precs = [], []
    for q in np.nonzero(class_set > 0)[0]:
        cand = np.nonzero(case != case[q])[0]
        rel = (class_set[cand] == class_set[q]) & (np.abs(level[cand] - level[q]) <= tolerance)
        order = cand[np.lexsort((cand, dist[q, cand]))]
        rel_ranked = ((class_set[order] == class_set[q]) & (np.abs(level[order] - level[q]) <= tolerance))[:k]
        ap = average_precision_at_k(rel_ranked, k, int(rel.sum()))
        if not math.isnan(ap):
            aps.append(ap)
        precs.append(precision_at_k(rel_ranked, k))
    return {
        f"val_mAP@{k}": float(np.mean(aps)) if aps else math.nan,
        f"val_P@{k}": float(np.mean(precs)) if precs else math.nan,
        "val_queries": float(len(precs)),
    }


def _lr_factor(fraction: float, step: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))


def _optimizer(cfg: TrainConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, list[bool]]:
    o = cfg.optimizer
    lr = o.lr * cfg.data.batch_size / 256 if o.scale_lr_by_batch else o.lr
    groups: list[dict[str, Any]] = []
    fixed: list[bool] = []
    if isinstance(model, SimSiam) and o.fixed_predictor_lr:
        groups.append({"params": [*model.encoder.parameters(), *model.projector.parameters()], "lr": lr})
        groups.append({"params": list(model.predictor.parameters()), "lr": lr})
        fixed = [False, True]
    else:
        groups.append({"params": list(model.parameters()), "lr": lr})
        fixed = [False]
    for g in groups:
        g["base_lr"] = lr
    if o.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay
        )
    else:
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=o.weight_decay)
    return opt, fixed


def _embed_val(model: nn.Module, slices: BaselineSlices, device: torch.device) -> np.ndarray:
    model.eval()
    feats = []
    with torch.inference_mode():
        for start in range(0, slices.val_rows.size, 128):
            x = slices.images(slices.val_rows[start : start + 128]).to(device)
            if isinstance(model, SimSiam):
                feats.append(model.embed(x).float().cpu().numpy())
            else:
                assert isinstance(model, YNet)
                feats.append(model.hash_bits(x).cpu().numpy())
    model.train()
    return np.concatenate(feats)


def _validate(
    model: nn.Module, slices: BaselineSlices, device: torch.device, tolerance: float
) -> dict[str, float]:
    rows = slices.val_rows
    feats = _embed_val(model, slices, device)
    metric = "cosine" if isinstance(model, SimSiam) else "hamming"
    out = validation_retrieval(
        feats, metric, slices.class_set[rows], slices.level[rows], slices.row_case[rows], tolerance=tolerance
    )
    if isinstance(model, SimSiam):
        model.eval()
        with torch.inference_mode():
            x = slices.images(rows[:256]).to(device)
            z = torch.nn.functional.normalize(model.projector(model.embed(x)), dim=1)
        model.train()
        out["val_z_std_x_sqrt_dim"] = float(z.std(dim=0).mean() * math.sqrt(z.shape[1]))
    return out


def _batches(cfg: TrainConfig, slices: BaselineSlices, rng: np.random.Generator) -> Iterator[np.ndarray]:
    b = cfg.data.batch_size
    while True:
        if isinstance(cfg, YNetTrainConfig) and cfg.partner_fraction > 0:
            n_partner = int(b * cfg.partner_fraction)
            anchors = slices.sample(rng, b - n_partner)
            partners = slices.partners(rng, anchors[:n_partner], cfg.loss.level_tolerance)
            yield np.concatenate([anchors, partners])
        else:
            yield slices.sample(rng, b)


def _cohort_provenance(data_dir: Path, train_cases: list[str]) -> dict[str, Any]:
    from fdn_core.data.provenance import (
        FINGERPRINTS_KEY,
        TRAIN_CASES_KEY,
        TRAIN_COHORT_SEED_KEY,
        case_fingerprint,
        cases_of,
    )

    out: dict[str, Any] = {"train_cohort": str(data_dir), TRAIN_CASES_KEY: list(train_cases)}
    meta_path = data_dir / "cohort.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if "seed" in meta:
            out[TRAIN_COHORT_SEED_KEY] = int(meta["seed"])
        if "generator_version" in meta:
            out["train_cohort_generator"] = str(meta["generator_version"])
    out[FINGERPRINTS_KEY] = {c.case_id: case_fingerprint(c) for c in cases_of(data_dir, train_cases)}
    return out


def train_baseline(
    cfg: TrainConfig,
    data_dir: Path,
    out: Path,
    *,
    cache_dir: Path | None = None,
    device: torch.device | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    command: str = "",
    max_steps: int | None = None,
    max_minutes: float | None = None,
) -> RunResult:
    """Train the baseline ``cfg`` describes on ``data_dir``; writes the run folder ``out`` (module doc)."""
    from fdn_core.device import select_device

    device = device or select_device("auto")
    if threads is not None:
        torch.set_num_threads(int(threads))
    steps_total = int(max_steps or cfg.run.max_steps)
    minutes_total = max_minutes if max_minutes is not None else cfg.run.max_minutes
    method = "simsiam" if isinstance(cfg, SimSiamTrainConfig) else "ynet"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    slices = open_slices(
        data_dir,
        cache_dir or out / "cache",
        cfg.data.image_size,
        cfg.data.val_fraction,
        cfg.data.split_seed,
        cfg.data.min_brain_fraction,
        cfg.data.val_slices,
        progress=progress,
    )
    torch.manual_seed(cfg.run.seed)
    rng = np.random.default_rng(cfg.run.seed)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    model: SimSiam | YNet = SimSiam(cfg.model) if isinstance(cfg, SimSiamTrainConfig) else YNet(cfg.model)
    model = model.to(device).train()
    opt, fixed = _optimizer(cfg, model)
    simsiam_loss = SimSiamLoss()
    ynet_loss = YNetLoss(cfg.loss) if isinstance(cfg, YNetTrainConfig) else None
    augment = MRViewAugment(cfg.augment) if isinstance(cfg, SimSiamTrainConfig) else None
    tolerance = cfg.loss.level_tolerance if isinstance(cfg, YNetTrainConfig) else 0.05
    train_log, val_log = _Csv(out / "train_log.csv"), _Csv(out / "val_log.csv")
    preprocess = PreprocessConfig(cfg.data.image_size)
    t0 = time.perf_counter()
    seen = 0
    acc: dict[str, float] = {}
    n_acc = 0
    validation: dict[str, float] = {}
    step = 0
    batches = _batches(cfg, slices, rng)

    def budget_used() -> float:
        minutes = (time.perf_counter() - t0) / 60.0
        frac = step / steps_total
        return max(frac, minutes / minutes_total) if minutes_total else frac

    def export(folder: Path, final: bool) -> Path:
        meta: dict[str, Any] = {
            "method": method,
            "train_command": command,
            "train_config": config_to_dict(cfg),
            "budget": {
                "steps": step,
                "slices_seen": seen,
                "minutes": round((time.perf_counter() - t0) / 60.0, 2),
                "threads": torch.get_num_threads(),
                "device": str(device),
                "max_steps": steps_total,
                "max_minutes": minutes_total,
            },
            "validation": {k: (None if math.isnan(v) else v) for k, v in validation.items()},
            "final": final,
        }
        if final:
            meta.update(_cohort_provenance(data_dir, slices.train_cases))
        return save_baseline(model, preprocess, folder, meta, overwrite=True)

    while step < steps_total and budget_used() < 1.0:
        rows = next(batches)
        factor = _lr_factor(budget_used(), step, cfg.optimizer.warmup_steps)
        for group, is_fixed in zip(opt.param_groups, fixed):
            group["lr"] = group["base_lr"] * (1.0 if is_fixed else factor)
        x = slices.images(rows)
        if augment is not None:
            v1 = augment.view(x, gen).to(device)
            v2 = augment.view(x, gen).to(device)
            assert isinstance(model, SimSiam)
            o1, o2 = model(v1), model(v2)
            loss = simsiam_loss(o1.p, o2.p, o1.z, o2.z)
            terms = {"loss": float(loss.detach())}
        else:
            assert isinstance(cfg, YNetTrainConfig) and isinstance(model, YNet) and ynet_loss is not None
            seg = slices.labels(rows)
            x, seg = augment_with_labels(x, seg, gen, cfg.flip_prob, cfg.max_rotation_deg, cfg.scale_range)
            o = model(x.to(device))
            loss, terms = ynet_loss(
                o.seg_logits, o.class_logits, o.hash_relaxed, seg.to(device),
                torch.as_tensor(slices.level[rows], dtype=torch.float32, device=device),
            )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optimizer.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        step += 1
        seen += len(rows)
        for k, v in terms.items():
            acc[k] = acc.get(k, 0.0) + v
        n_acc += 1
        if step % cfg.run.log_every == 0 or step == steps_total:
            elapsed = time.perf_counter() - t0
            row = {"step": step, "elapsed_s": elapsed, "slices_seen": seen, "lr": opt.param_groups[0]["lr"]}
            row.update({k: v / n_acc for k, v in acc.items()})
            train_log.write(row)
            acc, n_acc = {}, 0
            if progress is not None:
                progress.update(step, steps_total, f"training {method}")
        if step % cfg.run.val_every == 0:
            validation = _validate(model, slices, device, tolerance)
            val_log.write({"step": step, "elapsed_s": time.perf_counter() - t0, **validation})
        if step % cfg.run.checkpoint_every == 0:
            export(out / "last", final=False)
    if step % cfg.run.val_every or not validation:
        validation = _validate(model, slices, device, tolerance)
        val_log.write({"step": step, "elapsed_s": time.perf_counter() - t0, **validation})
    bundle = export(out / "bundle", final=True)
    minutes = (time.perf_counter() - t0) / 60.0
    return RunResult(step, seen, minutes, bundle, validation)
