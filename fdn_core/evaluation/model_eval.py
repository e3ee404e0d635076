"""Evaluation of a trained FDN (paper 4.4.1-4.4.4): reconstruction, segmentation, compactness, leakiness.

- Reconstruction error (4.4.1), per slice at model resolution: ``sum |x - x_hat_plus|`` and
  ``sum |M^- (x - x_hat_minus)|`` with ``M^-`` the normal region (abnormal label 0), plus the per-voxel means
  (the sums divided by the number of summed elements). Every slice of every case is used, empty ones
  included, as in the paper.
- Segmentation (4.4.2): Dice per abnormal class (NCR/NET, ED, ET) and for the whole tumour, on the 3D
  volume re-stacked from the slice predictions and mapped back to the case's original grid.
- Compactness (4.4.4): share of codebook vectors with L2 norm < 1e-5; plus usage (how many codes the data
  ever selects, and the perplexity ``exp(entropy)`` of the selection histogram).
- Leakiness (4.4.3): a small CNN is trained to tell, from the normal-appearing reconstruction alone, whether
  the slice came from a diseased slice; PPV (and AUC) on held-out cases (case-wise split, balanced classes,
  so 0.5 is chance). Why a CNN and not a linear model: leaked tumour can appear anywhere in the slice, and a
  convolutional net with global pooling detects a local pattern wherever it is, as the paper's (larger)
  classification network does; a linear model on downsampled pixels is not translation invariant and would
  under-report leakage. The same classifier trained on the full reconstructions is reported as a control
  (the paper's Fig. 9 shows both; the control should be far above chance).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fdn_core.errors import DataError
from fdn_core.evaluation.metrics import abnormal_dice, ppv, roc_auc
from fdn_core.fileio import atomic_write_bytes, atomic_write_json
from fdn_core.labels import ABNORMAL_DICE_GROUPS
from fdn_core.progress import Progress

__all__ = [
    "LeakinessSettings",
    "code_usage",
    "codebook_compactness",
    "evaluate_model",
    "leakiness",
    "markdown_report",
    "reconstruction_errors",
    "write_model_eval",
]

COMPACTNESS_THRESHOLD = 1e-5


# --------------------------------------------------------------------------------------------- metrics
def reconstruction_errors(
    images: np.ndarray, recon_full: np.ndarray, recon_normal: np.ndarray, seg: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-slice L1 reconstruction errors of paper section 4.4.1.

    images, recon_full, recon_normal: (N, C, H, W); seg: (N, H, W) abnormal labels (0 = normal region M^-).
    Returns arrays of length N: ``full_sum`` = sum |x - x_hat_plus|,
    ``normal_sum`` = sum |M^-(x - x_hat_minus)|,
    ``full_mean`` = full_sum / (C H W), ``normal_mean`` = normal_sum / (C |M^-|) (NaN where M^- is empty).
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or recon_full.shape != images.shape or recon_normal.shape != images.shape:
        raise ValueError(
            f"reconstruction_errors: expected three (N,C,H,W) arrays of one shape, got "
            f"{images.shape}, {recon_full.shape}, {recon_normal.shape}"
        )
    if seg.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"reconstruction_errors: seg shape {seg.shape} does not match images {images.shape}")
    n, c = images.shape[:2]
    normal = (np.asarray(seg) == 0)[:, None]  # (N,1,H,W), broadcast over channels
    full_sum = np.abs(images - recon_full).reshape(n, -1).sum(1)
    normal_sum = (np.abs(images - recon_normal) * normal).reshape(n, -1).sum(1)
    n_normal = normal.reshape(n, -1).sum(1) * c
    with np.errstate(invalid="ignore", divide="ignore"):
        normal_mean = np.where(n_normal > 0, normal_sum / np.maximum(n_normal, 1), np.nan)
    return {
        "full_sum": full_sum,
        "normal_sum": normal_sum,
        "full_mean": full_sum / (images[0].size),
        "normal_mean": normal_mean,
    }


def codebook_compactness(codebook: np.ndarray, threshold: float = COMPACTNESS_THRESHOLD) -> float:
    """Share of code vectors (rows of ``codebook`` (K, D)) with L2 norm below ``threshold`` (paper 4.4.4)."""
    codebook = np.asarray(codebook, dtype=np.float64)
    if codebook.ndim != 2 or codebook.shape[0] == 0:
        raise ValueError(f"codebook_compactness: expected a (K, D) codebook, got shape {codebook.shape}")
    return float((np.linalg.norm(codebook, axis=1) < threshold).mean())


def code_usage(counts: np.ndarray) -> dict[str, float]:
    """Usage of a codebook from its selection histogram ``counts`` (K,): codes used, share used, perplexity.

    Perplexity is ``exp(-sum p log p)`` of the selection frequencies: K when all codes are used equally,
    1 when a single code is always selected.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("code_usage: the histogram is empty (no code selections were counted)")
    p = counts[counts > 0] / total
    return {
        "used": int((counts > 0).sum()),
        "used_fraction": float((counts > 0).mean()),
        "perplexity": float(math.exp(-(p * np.log(p)).sum())),
    }


# ------------------------------------------------------------------------------------------ leakiness
@dataclass(frozen=True)
class LeakinessSettings:
    """Settings of the leakiness classifier (paper 4.4.3 / appendix D, scaled down to run on a CPU).

    input_size: reconstructions are average-pooled to this side before classification.
    slices_per_case: at most this many diseased and this many healthy slices are taken from each case
    (evenly spread), so one big case cannot dominate. min_brain_fraction: only slices whose input has at
    least this share of non-zero pixels are used, so "empty slice = healthy" is not a usable cue.
    train_fraction: share of cases (stratified by tumour / healthy) used to train; the rest test.
    width: channels of the first conv stage (doubled at each of the three stages).
    """

    input_size: int = 64
    width: int = 16
    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    train_fraction: float = 0.5
    slices_per_case: int = 24
    min_brain_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input_size < 16 or self.input_size % 8:
            raise ValueError(f"leakiness input_size={self.input_size}: must be a multiple of 8 and >= 16")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"leakiness train_fraction={self.train_fraction}: must be in (0, 1)")
        if min(self.epochs, self.batch_size, self.slices_per_case, self.width) < 1:
            raise ValueError("leakiness epochs, batch_size, slices_per_case and width must be >= 1")


class _LeakCNN(nn.Module):
    """Three conv-ReLU-maxpool stages, global average pooling, one logit (a small appendix-D network)."""

    def __init__(self, in_channels: int = 4, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(1)


def _split_cases(
    case_ids: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Case-wise split stratified by whether the case contributes any diseased slice."""
    cases = sorted(set(case_ids.tolist()))
    diseased = {c for c in cases if labels[case_ids == c].any()}
    train: set[str] = set()
    for stratum in (sorted(diseased), sorted(set(cases) - diseased)):
        order = rng.permutation(len(stratum))
        n_train = round(fraction * len(stratum))
        if len(stratum) >= 2:
            n_train = min(max(n_train, 1), len(stratum) - 1)
        train.update(stratum[i] for i in order[:n_train])
    return np.isin(case_ids, sorted(train))


def _balance(indices: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Undersample the majority class so both classes have the minority's count (sorted indices)."""
    pos = indices[labels[indices]]
    neg = indices[~labels[indices]]
    n = min(len(pos), len(neg))
    keep = np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)])
    return np.sort(keep)


def leakiness(
    samples: np.ndarray,
    labels: np.ndarray,
    case_ids: Sequence[str],
    settings: LeakinessSettings | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train the leakiness classifier on held-in cases and report PPV/AUC on held-out cases.

    samples: (N, C, s, s) reconstructions (already pooled to ``settings.input_size``); labels: (N,) True where
    the source slice had an abnormal label; case_ids: (N,) case of each slice. Both splits are balanced by
    undersampling, so PPV 0.5 is chance. Returns ppv, auc, accuracy and the counts; PPV/AUC are NaN (with a
    ``note``) when a split lacks one of the classes.
    """
    settings = settings or LeakinessSettings()
    labels = np.asarray(labels, dtype=bool)
    case_arr = np.asarray(list(case_ids), dtype=object).astype(str)
    if not len(samples) == len(labels) == len(case_arr):
        raise ValueError("leakiness: samples, labels and case_ids must have the same length")
    rng = np.random.default_rng(settings.seed)
    train_mask = _split_cases(case_arr, labels, settings.train_fraction, rng)
    result: dict[str, Any] = {"ppv": float("nan"), "auc": float("nan"), "accuracy": float("nan")}
    splits = {}
    for name, mask in (("train", train_mask), ("test", ~train_mask)):
        idx = np.flatnonzero(mask)
        n_pos, n_neg = int(labels[idx].sum()), int((~labels[idx]).sum())
        if n_pos == 0 or n_neg == 0:
            result.update(
                n_train=0,
                n_test=0,
                note=f"{name} split has {n_pos} diseased and {n_neg} healthy slices; "
                "evaluate more cases (both healthy and tumour slices are needed on both sides)",
            )
            return result
        splits[name] = _balance(idx, labels, rng)
    tr, te = splits["train"], splits["test"]
    x_tr = torch.from_numpy(np.ascontiguousarray(samples[tr], dtype=np.float32))
    y_tr = torch.from_numpy(labels[tr].astype(np.float32))
    x_te = torch.from_numpy(np.ascontiguousarray(samples[te], dtype=np.float32))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = _LeakCNN(in_channels=samples.shape[1], width=settings.width)
        opt = torch.optim.Adam(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        loss_fn = nn.BCEWithLogitsLoss()
        gen = torch.Generator().manual_seed(settings.seed)
        steps_per_epoch = math.ceil(len(tr) / settings.batch_size)
        net.train()
        for epoch in range(settings.epochs):
            order = torch.randperm(len(tr), generator=gen)
            for b in range(steps_per_epoch):
                sel = order[b * settings.batch_size : (b + 1) * settings.batch_size]
                opt.zero_grad(set_to_none=True)
                loss_fn(net(x_tr[sel]), y_tr[sel]).backward()
                opt.step()
            if progress is not None:
                progress.update(epoch + 1, settings.epochs, "leakiness classifier")
        net.eval()
        with torch.no_grad():
            scores = torch.cat(
                [torch.sigmoid(net(x_te[i : i + 256])) for i in range(0, len(te), 256)]
            ).numpy()
    y_te = labels[te]
    pred = scores >= 0.5
    result.update(
        ppv=ppv(y_te, pred),
        auc=roc_auc(y_te, scores),
        accuracy=float((pred == y_te).mean()),
        n_train=len(tr),
        n_test=len(te),
        train_cases=len(set(case_arr[tr].tolist())),
        test_cases=len(set(case_arr[te].tolist())),
    )
    if not pred.any():
        result["note"] = "the classifier predicted no slice as diseased (PPV undefined: no detectable leak)"
    return result


# ------------------------------------------------------------------------------------------- the run
def _pool(images: np.ndarray, size: int) -> np.ndarray:
    """(N, C, S, S) -> (N, C, size, size) by area averaging (S a multiple of size), float32."""
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if t.shape[-1] != size:
        t = torch.nn.functional.adaptive_avg_pool2d(t, size)
    return t.numpy()


def _spread(indices: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` of ``indices``, evenly spread (deterministic)."""
    if len(indices) <= n:
        return indices
    return indices[np.unique(np.linspace(0, len(indices) - 1, n).round().astype(int))]


def _summary(values: list[float] | np.ndarray) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


@torch.inference_mode()
def _run_model(model: nn.Module, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """One eval-mode forward pass over (N, C, S, S) slices: reconstructions, labels, code indices."""
    from fdn_core.device import autocast_for

    device = next(model.parameters()).device
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("recon_full", "recon_normal", "seg", "idx_n", "idx_a")
    }
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device)
        with autocast_for(device):
            out = model(x)
        parts["recon_full"].append(out.recon_full.float().cpu().numpy())
        parts["recon_normal"].append(out.recon_normal.float().cpu().numpy())
        parts["seg"].append(out.seg_logits.argmax(1).to(torch.uint8).cpu().numpy())
        parts["idx_n"].append(out.idx_normal.cpu().numpy())
        parts["idx_a"].append(out.idx_abnormal.cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate_model(
    bundle: Any,
    data_dir: str | Path,
    cases: Sequence[str] | None = None,
    *,
    leak: LeakinessSettings | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate an inference bundle (a path or an ``InferenceBundle``) on the labelled cases of a cohort.

    ``cases``: case ids to use (default: all). Returns a JSON-ready dict with ``reconstruction``,
    ``segmentation`` (Dice per class, mean over cases, and per case), ``codebooks`` (compactness, usage) and
    ``leakiness`` (normal-appearing reconstructions, and the full-reconstruction control).
    """
    from fdn_core.data.preprocess import slices_to_volume, volume_to_slices
    from fdn_core.data.readers import find_cases, load_case
    from fdn_core.model.bundle import load_bundle

    leak = leak or LeakinessSettings()
    if isinstance(bundle, (str, Path)):
        bundle = load_bundle(bundle)
    model = bundle.model
    model.eval()
    files = list(find_cases(data_dir))
    if cases:
        by_id = {f.case_id: f for f in files}
        missing = [c for c in cases if c not in by_id]
        if missing:
            raise DataError(
                f"{data_dir}: case(s) {missing} not found; available: {sorted(by_id)[:20]}"
                f"{' ...' if len(by_id) > 20 else ''}"
            )
        files = [by_id[c] for c in cases]
    if not files:
        raise DataError(f"{data_dir}: no cases found; point --data at a BraTS / MSD / phantom cohort folder")
    num_codes = int(model.config.num_codes)
    counts = {"normal": np.zeros(num_codes, np.int64), "abnormal": np.zeros(num_codes, np.int64)}
    rec: dict[str, list[np.ndarray]] = {}
    per_case: list[dict[str, Any]] = []
    leak_normal, leak_full, leak_labels, leak_cases = [], [], [], []
    for i, case_files in enumerate(files):
        if progress is not None:
            progress.update(i, len(files), "evaluating cases")
        case = load_case(case_files)
        if case.seg is None:
            raise DataError(
                f"case {case.case_id}: no abnormal label file; model evaluation needs labelled cases "
                "(pass --cases to pick labelled ones)"
            )
        stack = volume_to_slices(case, bundle.preprocess)
        assert stack.seg is not None
        out = _run_model(model, stack.images, batch_size)
        for k, v in reconstruction_errors(
            stack.images, out["recon_full"], out["recon_normal"], stack.seg
        ).items():
            rec.setdefault(k, []).append(v)
        pred_volume = slices_to_volume(out["seg"], stack.geometry)
        case_dice = abnormal_dice(pred_volume, case.seg)
        per_case.append({"case_id": case.case_id, "slices": len(stack.images), "dice": case_dice})
        counts["normal"] += np.bincount(out["idx_n"].ravel(), minlength=num_codes)
        counts["abnormal"] += np.bincount(out["idx_a"].ravel(), minlength=num_codes)
        # Leakiness samples: brain slices only, at most slices_per_case of each kind, evenly spread.
        brain_share = (stack.images != 0).any(axis=1).reshape(len(stack.images), -1).mean(1)
        brain = brain_share >= leak.min_brain_fraction
        diseased = np.asarray(stack.seg.reshape(len(stack.seg), -1).any(axis=1), dtype=bool)
        chosen = np.concatenate(
            [
                _spread(np.flatnonzero(brain & diseased), leak.slices_per_case),
                _spread(np.flatnonzero(brain & ~diseased), leak.slices_per_case),
            ]
        )
        if len(chosen):
            leak_normal.append(_pool(out["recon_normal"][chosen], leak.input_size))
            leak_full.append(_pool(out["recon_full"][chosen], leak.input_size))
            leak_labels.append(diseased[chosen])
            leak_cases += [case.case_id] * len(chosen)
    if progress is not None:
        progress.update(len(files), len(files), "evaluating cases")

    reconstruction = {k: _summary(np.concatenate(v)) for k, v in rec.items()}
    segmentation = {name: _summary([c["dice"][name] for c in per_case]) for name in ABNORMAL_DICE_GROUPS}
    codebook_normal = model.codebook("normal").detach().float().cpu().numpy()
    codebook_abnormal = model.codebook("abnormal").detach().float().cpu().numpy()
    codebooks = {
        which: {
            "num_codes": num_codes,
            "compactness": codebook_compactness(book),
            **code_usage(counts[which]),
        }
        for which, book in (("normal", codebook_normal), ("abnormal", codebook_abnormal))
    }
    if leak_labels:
        labels = np.concatenate(leak_labels)
        leakiness_result = {
            "normal_appearing": leakiness(np.concatenate(leak_normal), labels, leak_cases, leak, progress),
            "full_control": leakiness(np.concatenate(leak_full), labels, leak_cases, leak, progress),
        }
    else:
        nan_result = {
            "ppv": float("nan"),
            "auc": float("nan"),
            "note": "no brain slices in the evaluated cases",
        }
        leakiness_result = {"normal_appearing": nan_result, "full_control": dict(nan_result)}
    return {
        "bundle": {
            "fingerprint": getattr(bundle, "fingerprint", None),
            "image_size": int(model.config.image_size),
            "latent_size": int(model.config.latent_size),
        },
        "data": {
            "dir": str(data_dir),
            "cases": [c["case_id"] for c in per_case],
            "slices": int(sum(c["slices"] for c in per_case)),
        },
        "reconstruction": reconstruction,
        "segmentation": segmentation,
        "segmentation_per_case": per_case,
        "codebooks": codebooks,
        "leakiness": leakiness_result,
        "leakiness_settings": dataclasses.asdict(leak),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown_report(results: dict[str, Any]) -> str:
    """A markdown summary (tables) of ``evaluate_model``'s results."""
    lines = [
        "# FDN model evaluation",
        "",
        f"Cases: {len(results['data']['cases'])}, slices: {results['data']['slices']}, "
        f"latent {results['bundle']['latent_size']}x{results['bundle']['latent_size']}, "
        f"input {results['bundle']['image_size']}.",
        "",
        "## Reconstruction error (paper 4.4.1; per slice, mean ± std over slices)",
        "",
        "| error | mean | std |",
        "|---|---|---|",
    ]
    names = {
        "full_sum": "sum abs(x - x_hat+)",
        "normal_sum": "sum abs(M- (x - x_hat-))",
        "full_mean": "mean abs(x - x_hat+) per voxel",
        "normal_mean": "mean abs(x - x_hat-) per normal voxel",
    }
    for key, label in names.items():
        s = results["reconstruction"][key]
        lines.append(f"| {label} | {_fmt(s['mean'])} | {_fmt(s['std'])} |")
    lines += [
        "",
        "## Segmentation Dice on re-stacked 3D volumes (paper 4.4.2; mean ± std over cases where defined)",
        "",
        "| class | mean | std | cases |",
        "|---|---|---|---|",
    ]
    for key, label in (("ncr_net", "NCR/NET"), ("ed", "ED"), ("et", "ET"), ("whole_tumour", "whole tumour")):
        s = results["segmentation"][key]
        lines.append(f"| {label} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {s['n']} |")
    lines += [
        "",
        "## Codebooks (paper 4.4.4)",
        "",
        "| codebook | compactness (norm < 1e-5) | codes used | share used | perplexity |",
        "|---|---|---|---|---|",
    ]
    for which in ("normal", "abnormal"):
        s = results["codebooks"][which]
        lines.append(
            f"| {which} | {_fmt(s['compactness'])} | {s['used']} / {s['num_codes']} | "
            f"{_fmt(s['used_fraction'])} | {_fmt(s['perplexity'])} |"
        )
    lines += [
        "",
        "## Leakiness (paper 4.4.3; small CNN, held-out cases, balanced: 0.5 = chance, lower is better)",
        "",
        "| classifier input | PPV | AUC | accuracy | train / test slices |",
        "|---|---|---|---|---|",
    ]
    notes = []
    for key, label in (
        ("normal_appearing", "normal-appearing x_hat-"),
        ("full_control", "full x_hat+ (control)"),
    ):
        s = results["leakiness"][key]
        counts = f"{s.get('n_train', 0)} / {s.get('n_test', 0)}"
        accuracy = _fmt(s.get("accuracy", float("nan")))
        lines.append(f"| {label} | {_fmt(s['ppv'])} | {_fmt(s['auc'])} | {accuracy} | {counts} |")
        if "note" in s:
            notes.append(f"- {label}: {s['note']}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _json_safe(obj: Any) -> Any:
    """NaN -> None (JSON has no NaN), numpy scalars -> Python numbers, recursively."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_model_eval(results: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``model_eval.json`` (NaN as null) and ``model_eval.md`` into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "model_eval.json", out_dir / "model_eval.md"
    atomic_write_json(json_path, _json_safe(results))
    atomic_write_bytes(md_path, markdown_report(results).encode("utf-8"))
    return json_path, md_path
