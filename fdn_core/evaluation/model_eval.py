"""Evaluation of a trained FDN (paper 4.4.1-4.4.5): reconstruction, segmentation, codebooks, leakiness.

- Reconstruction error (4.4.1), per slice at model resolution: ``sum |x - x_hat_plus|`` and
  ``sum |M^- (x - x_hat_minus)|`` with ``M^-`` the normal region (abnormal label 0), plus the per-voxel means
  (the sums divided by the number of summed elements). Every slice of every case is used, empty ones
  included, as in the paper.
- Segmentation (4.4.2): Dice per abnormal class (NCR/NET, ED, ET) and for the whole tumour, on the 3D
  volume re-stacked from the slice predictions and mapped back to the case's original grid.
- Codebooks (4.4.4-4.4.5): compactness as the paper defines it (share of code vectors with L2 norm < 1e-5)
  beside what it is meant to measure, the share of codes *unused*: on the evaluated data, and in training
  when the bundle records it (``InferenceBundle.code_usage()``). With the EMA update a dead code's norm
  says how long ago it died (it jumps to ~1e5 and decays by the EMA decay per step), so compactness alone
  misleads. Usage: codes the data selects, and the perplexity ``exp(entropy)`` of the selection histogram.
  Binarisation (Algorithm A.1, as ``fdn index`` fits it: codes unused in training excluded): bits kept,
  as a share of K(K-1)/2, and the top-1/5/10 concordance over all K (the paper's definition) and over the
  used codes only.
- Leakiness (4.4.3): a small CNN is trained to tell, from the normal-appearing reconstruction alone, whether
  the slice came from a diseased slice; PPV (and AUC) on held-out cases (balanced classes, so 0.5 is
  chance). As in the paper (appendix D) the classifier learns on reconstructions of the FDN's *training*
  cases (``train_cases``: the bundle's recorded training cases, found in the training cohort; a share of
  them is held back for early stopping) and is tested on the evaluated, held-out cases. Without the
  training cohort, the evaluated cases are split case-wise instead (a weaker protocol, said in the
  results). Why a CNN and not a linear model: leaked tumour can appear anywhere in the slice, and a
  convolutional net with global pooling detects a local pattern wherever it is, as the paper's (larger)
  classification network does; a linear model on downsampled pixels is not translation invariant and would
  under-report leakage. The same classifier trained on the full reconstructions is reported as a control
  (the paper's Fig. 9 shows both; the control should be far above chance).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fdn_core.errors import DataError
from fdn_core.evaluation.metrics import abnormal_dice, ppv, roc_auc
from fdn_core.fileio import atomic_write_bytes, atomic_write_json
from fdn_core.labels import ABNORMAL_DICE_GROUPS, MIN_LESION_ML
from fdn_core.model.lesions import check_min_lesion_ml, remove_small_lesions
from fdn_core.progress import Progress

__all__ = [
    "LeakinessSettings",
    "binarization_summary",
    "code_usage",
    "codebook_compactness",
    "evaluate_model",
    "leakiness",
    "markdown_report",
    "reconstruction_errors",
    "write_model_eval",
]

COMPACTNESS_THRESHOLD = 1e-5
log = logging.getLogger(__name__)

#: The note of the leakiness results when no training cohort was given.
SPLIT_NOTE = (
    "classifier trained and tested on a case-wise split of the evaluated cases, not on the FDN's training "
    "cases as in the paper (pass --train-data with the training cohort for the paper's protocol)"
)


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

    The paper trains a VGG-like network (5 stages up to 512 channels, 256x256 input) for 100 epochs. Here:
    reconstructions average-pooled to ``input_size`` (32: a BraTS-sized tumour still spans several
    pixels, and a training epoch costs a quarter of 64), three conv stages of ``width``, 2x, 4x channels
    with batch norm, global average pooling and one logit; at most ``epochs`` epochs with early stopping
    when the loss on ``val_fraction`` of the training cases (case-wise) has not improved for ``patience``
    epochs, the best epoch's weights kept. Leaks (or, in the control, tumours) are detected within a few
    epochs; the rest would only memorise the training cases. That fits a CPU in minutes.

    slices_per_case: at most this many diseased and this many healthy slices are taken from each case
    (evenly spread), so one big case cannot dominate. min_brain_fraction: only slices whose input has at
    least this share of non-zero pixels are used, so "empty slice = healthy" is not a usable cue.
    train_fraction: without training cases (no ``--train-data``), the share of evaluated cases (stratified
    by tumour / healthy) used to train; the rest test.
    """

    input_size: int = 32
    width: int = 16
    epochs: int = 40
    patience: int = 6
    val_fraction: float = 0.2
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    train_fraction: float = 0.5
    slices_per_case: int = 16
    min_brain_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input_size < 8 or self.input_size % 8:
            raise ValueError(f"leakiness input_size={self.input_size}: must be a multiple of 8 and >= 8")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"leakiness train_fraction={self.train_fraction}: must be in (0, 1)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"leakiness val_fraction={self.val_fraction}: must be in [0, 1)")
        if min(self.epochs, self.batch_size, self.slices_per_case, self.width, self.patience) < 1:
            raise ValueError("leakiness epochs, patience, batch_size, slices_per_case and width must be >= 1")


class _LeakCNN(nn.Module):
    """Three (conv-BN-ReLU) x 2 + maxpool stages, global average pooling, one logit (appendix D, smaller)."""

    def __init__(self, in_channels: int = 4, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in (width, 2 * width, 4 * width):
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
            layers.append(nn.MaxPool2d(2))
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


def _both_classes(idx: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    return int(labels[idx].sum()), int((~labels[idx]).sum())


def _fit_classifier(
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    x_val: torch.Tensor | None,
    y_val: torch.Tensor | None,
    settings: LeakinessSettings,
    progress: Progress | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the classifier (random left-right flips); early stopping on the validation loss when given.
    Returns the net (best validation epoch's weights, eval mode) and what the training did."""
    net = _LeakCNN(in_channels=x_tr.shape[1], width=settings.width)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(settings.seed)
    bs = settings.batch_size
    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(net.state_dict())
    epochs_run = 0
    for epoch in range(settings.epochs):
        net.train()
        order = torch.randperm(len(x_tr), generator=gen)
        flips = torch.rand(len(x_tr), generator=gen) < 0.5
        for b in range(0, len(order), bs):
            sel = order[b : b + bs]
            xb = x_tr[sel]
            xb = torch.where(flips[sel, None, None, None], xb.flip(2), xb)  # axis 0 of a slice: left-right
            opt.zero_grad(set_to_none=True)
            loss_fn(net(xb), y_tr[sel]).backward()
            opt.step()
        epochs_run = epoch + 1
        if progress is not None:
            progress.update(epoch + 1, settings.epochs, "leakiness classifier")
        if x_val is None or y_val is None:
            continue
        net.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(_logits(net, x_val), y_val))
        if val_loss < best_loss - 1e-4:
            best_loss, best_epoch, best_state = val_loss, epoch + 1, copy.deepcopy(net.state_dict())
        elif epoch + 1 - best_epoch >= settings.patience:
            break
    if x_val is not None:
        net.load_state_dict(best_state)
    else:
        best_epoch = epochs_run
    net.eval()
    info = {
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "val_loss": best_loss if x_val is not None and math.isfinite(best_loss) else float("nan"),
        "early_stopping": x_val is not None,
    }
    return net, info


def _logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([net(x[i : i + 256]) for i in range(0, len(x), 256)])


def leakiness(
    samples: np.ndarray,
    labels: np.ndarray,
    case_ids: Sequence[str],
    settings: LeakinessSettings | None = None,
    progress: Progress | None = None,
    *,
    train_cases: Collection[str] | None = None,
) -> dict[str, Any]:
    """Train the leakiness classifier on training cases and report PPV/AUC on held-out cases.

    samples: (N, C, s, s) reconstructions (already pooled to ``settings.input_size``); labels: (N,) True where
    the source slice had an abnormal label; case_ids: (N,) case of each slice. ``train_cases``: the cases
    the classifier learns from (the paper: the FDN's training cases); every other case tests. Without
    them the cases are split case-wise (``settings.train_fraction``). ``settings.val_fraction`` of the
    training cases are held back for early stopping. Every split is balanced by undersampling, so PPV 0.5
    is chance. Returns ppv, auc, accuracy, the counts and how the classifier trained; PPV/AUC are NaN
    (with a ``note``) when a split lacks one of the classes.
    """
    settings = settings or LeakinessSettings()
    labels = np.asarray(labels, dtype=bool)
    case_arr = np.asarray(list(case_ids), dtype=object).astype(str)
    if not len(samples) == len(labels) == len(case_arr):
        raise ValueError("leakiness: samples, labels and case_ids must have the same length")
    rng = np.random.default_rng(settings.seed)
    if train_cases is None:
        train_mask = _split_cases(case_arr, labels, settings.train_fraction, rng)
        protocol = "case-wise split of the evaluated cases"
    else:
        train_mask = np.isin(case_arr, sorted(set(train_cases)))
        protocol = "trained on the FDN's training cases, tested on held-out cases"
    result: dict[str, Any] = {
        "ppv": float("nan"),
        "auc": float("nan"),
        "accuracy": float("nan"),
        "protocol": protocol,
    }
    idx_train = np.flatnonzero(train_mask)
    val_mask = np.zeros(len(labels), dtype=bool)
    if settings.val_fraction > 0 and len(set(case_arr[idx_train].tolist())) >= 2:
        inner = _split_cases(case_arr[idx_train], labels[idx_train], 1.0 - settings.val_fraction, rng)
        candidate = np.zeros(len(labels), dtype=bool)
        candidate[idx_train[~inner]] = True
        n_pos, n_neg = _both_classes(np.flatnonzero(candidate), labels)
        n_pos_tr, n_neg_tr = _both_classes(np.flatnonzero(train_mask & ~candidate), labels)
        if min(n_pos, n_neg, n_pos_tr, n_neg_tr) > 0:  # else: no early stopping (too few cases)
            val_mask = candidate
    splits = {}
    for name, mask in (("train", train_mask & ~val_mask), ("test", ~train_mask), ("val", val_mask)):
        idx = np.flatnonzero(mask)
        if name == "val" and not len(idx):
            continue
        n_pos, n_neg = _both_classes(idx, labels)
        if n_pos == 0 or n_neg == 0:
            result.update(
                n_train=0,
                n_test=0,
                note=f"{name} split has {n_pos} diseased and {n_neg} healthy slices; "
                "evaluate more cases (both healthy and tumour slices are needed on both sides)",
            )
            return result
        splits[name] = _balance(idx, labels, rng)
    tr, te, va = splits["train"], splits["test"], splits.get("val")

    def tensor(rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(samples[rows], dtype=np.float32))

    def target(rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(labels[rows].astype(np.float32))

    # One torch thread while the classifier trains and scores: with several, the order of the convolutions'
    # float sums follows the thread count, early stopping then picks another epoch, and the same seeded run
    # gave PPV 0.77 with 2 threads and 0.86 with 1 (measured on the shipped model's cohort 9101).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            net, info = _fit_classifier(
                tensor(tr),
                target(tr),
                None if va is None else tensor(va),
                None if va is None else target(va),
                settings,
                progress,
            )
            with torch.no_grad():
                scores = torch.sigmoid(_logits(net, tensor(te))).numpy()
    finally:
        torch.set_num_threads(threads)
    y_te = labels[te]
    pred = scores >= 0.5
    result.update(
        ppv=ppv(y_te, pred),
        auc=roc_auc(y_te, scores),
        accuracy=float((pred == y_te).mean()),
        n_train=len(tr),
        n_val=0 if va is None else len(va),
        n_test=len(te),
        train_cases=len(set(case_arr[tr].tolist())),
        val_cases=0 if va is None else len(set(case_arr[va].tolist())),
        test_cases=len(set(case_arr[te].tolist())),
        **info,
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


def _leak_choice(stack: Any, leak: LeakinessSettings) -> tuple[np.ndarray, np.ndarray]:
    """Leakiness samples of a case: brain slices only, at most slices_per_case of each kind, evenly spread.
    Returns (chosen slice indices, diseased flag of every slice)."""
    brain_share = (stack.images != 0).any(axis=1).reshape(len(stack.images), -1).mean(1)
    brain = brain_share >= leak.min_brain_fraction
    diseased = np.asarray(stack.seg.reshape(len(stack.seg), -1).any(axis=1), dtype=bool)
    chosen = np.concatenate(
        [
            _spread(np.flatnonzero(brain & diseased), leak.slices_per_case),
            _spread(np.flatnonzero(brain & ~diseased), leak.slices_per_case),
        ]
    ).astype(np.int64)
    return chosen, diseased


class _LeakSamples:
    """Pooled reconstructions (normal-appearing and full), labels and case of the leakiness samples."""

    def __init__(self) -> None:
        self.normal: list[np.ndarray] = []
        self.full: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.cases: list[str] = []

    def add(
        self, key: str, out: dict[str, np.ndarray], rows: np.ndarray, labels: np.ndarray, size: int
    ) -> None:
        if len(rows):
            self.normal.append(_pool(out["recon_normal"][rows], size))
            self.full.append(_pool(out["recon_full"][rows], size))
            self.labels.append(labels)
            self.cases += [key] * len(rows)


def _training_cases(
    metadata: dict[str, Any], train_data: str | Path, evaluated: Sequence[Any]
) -> tuple[list[Any], dict[str, Any]]:
    """The bundle's recorded training cases found in ``train_data`` (checked against the recorded image
    fingerprints when there are any) and which evaluated cases are training cases (same image content)."""
    from fdn_core.data.provenance import FINGERPRINTS_KEY, case_fingerprint
    from fdn_core.data.readers import find_cases

    recorded = [str(c) for c in metadata.get("train_cases") or []]
    if not recorded:
        raise DataError(
            "the bundle records no training cases (metadata train_cases), so --train-data cannot pick the "
            "classifier's training cases; use a bundle exported by fdn train, or leave --train-data out"
        )
    found = {c.case_id: c for c in find_cases(train_data)}
    present = [found[c] for c in recorded if c in found]
    if not present:
        raise DataError(
            f"{train_data}: none of the bundle's {len(recorded)} training cases ({', '.join(recorded[:5])}"
            f"{' ...' if len(recorded) > 5 else ''}) is in this folder; pass the cohort the model was "
            "trained on"
        )
    train_fp = {c.case_id: case_fingerprint(c) for c in present}
    stored = metadata.get(FINGERPRINTS_KEY)
    if isinstance(stored, dict):
        differ = [cid for cid, fp in train_fp.items() if cid in stored and stored[cid] != fp]
    elif isinstance(stored, list):
        differ = [cid for cid, fp in train_fp.items() if fp not in set(stored)]
    else:
        differ = []
    if differ:
        raise DataError(
            f"{train_data}: case(s) {differ[:5]} have other images than the cases the model was trained on "
            "(image fingerprints recorded in the bundle differ); pass the training cohort itself"
        )
    trained = set(train_fp.values())
    overlap = [c.case_id for c in evaluated if case_fingerprint(c) in trained]
    info = {
        "train_data": str(train_data),
        "recorded": len(recorded),
        "found": len(present),
        "fingerprints_checked": bool(stored),
        "evaluated_training_cases": overlap,
    }
    return present, info


def evaluate_model(
    bundle: Any,
    data_dir: str | Path,
    cases: Sequence[str] | None = None,
    *,
    train_data: str | Path | None = None,
    leak: LeakinessSettings | None = None,
    batch_size: int = 32,
    binarize: bool = True,
    min_lesion_ml: float = MIN_LESION_ML,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate an inference bundle (a path or an ``InferenceBundle``) on the labelled cases of a cohort.

    ``cases``: case ids to use (default: all). ``train_data``: the cohort the bundle was trained on; the
    leakiness classifier then learns from reconstructions of the bundle's recorded training cases found
    there and is tested on the evaluated cases (those that are training cases, by image content, are left
    out of its test); without it the evaluated cases are split case-wise (noted in the results).
    ``binarize``: also fit the binary codes (Algorithm A.1) and report them. ``min_lesion_ml``: predicted
    lesions smaller than this are removed before scoring, as every interface shows the segmentation
    (``remove_small_lesions``); the unprocessed prediction is scored too. Returns a JSON-ready dict with
    ``reconstruction``, ``segmentation`` (Dice per class, mean over cases, and per case; over the cases
    with a tumour; false tumour in the healthy cases; the same for the unprocessed prediction), ``codebooks``
    (compactness, usage on the data and in training, binarisation) and ``leakiness`` (normal-appearing
    reconstructions, and the full-reconstruction control).
    """
    from fdn_core.data.preprocess import slices_to_volume, volume_to_slices
    from fdn_core.data.readers import find_cases, load_case
    from fdn_core.model.bundle import load_bundle

    leak = leak or LeakinessSettings()
    check_min_lesion_ml(min_lesion_ml)
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
    metadata = dict(getattr(bundle, "metadata", {}) or {})
    train_files: list[Any] = []
    train_info: dict[str, Any] | None = None
    if train_data is not None:
        train_files, train_info = _training_cases(metadata, train_data, files)
    excluded = set() if train_info is None else set(train_info["evaluated_training_cases"])
    num_codes = int(model.config.num_codes)
    counts = {"normal": np.zeros(num_codes, np.int64), "abnormal": np.zeros(num_codes, np.int64)}
    rec: dict[str, list[np.ndarray]] = {}
    per_case: list[dict[str, Any]] = []
    samples = _LeakSamples()
    total = len(files) + len(train_files)
    for i, case_files in enumerate(files):
        if progress is not None:
            progress.update(i, total, "evaluating cases")
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
        assert stack.voxel_ml is not None  # volume_to_slices knows the spacing
        cleaned, cleanup = remove_small_lesions(out["seg"], stack.voxel_ml, min_lesion_ml)
        per_case.append(
            {
                "case_id": case.case_id,
                "slices": len(stack.images),
                "tumour": bool((case.seg > 0).any()),
                "dice": abnormal_dice(slices_to_volume(cleaned, stack.geometry), case.seg),
                "dice_unprocessed": abnormal_dice(slices_to_volume(out["seg"], stack.geometry), case.seg),
                "predicted_ml": cleanup.kept_ml,
                "predicted_ml_unprocessed": cleanup.kept_ml + cleanup.removed_ml,
                "lesions_removed": cleanup.removed,
            }
        )
        counts["normal"] += np.bincount(out["idx_n"].ravel(), minlength=num_codes)
        counts["abnormal"] += np.bincount(out["idx_a"].ravel(), minlength=num_codes)
        if case.case_id not in excluded:  # a training case cannot test the classifier
            chosen, diseased = _leak_choice(stack, leak)
            samples.add(f"eval:{case.case_id}", out, chosen, diseased[chosen], leak.input_size)
    for j, case_files in enumerate(train_files):
        if progress is not None:
            progress.update(len(files) + j, total, "reconstructing training cases")
        case = load_case(case_files)
        if case.seg is None:
            continue
        stack = volume_to_slices(case, bundle.preprocess)
        chosen, diseased = _leak_choice(stack, leak)
        if len(chosen):
            out = _run_model(model, np.ascontiguousarray(stack.images[chosen]), batch_size)
            rows = np.arange(len(chosen))
            samples.add(f"train:{case.case_id}", out, rows, diseased[chosen], leak.input_size)
    if progress is not None:
        progress.update(total, total, "evaluating cases")

    reconstruction = {k: _summary(np.concatenate(v)) for k, v in rec.items()}
    segmentation = _segmentation_summary(per_case, "", min_lesion_ml)
    segmentation["unprocessed"] = _segmentation_summary(per_case, "_unprocessed", 0.0)
    usage = bundle.code_usage() if hasattr(bundle, "code_usage") else None
    codebooks = _codebooks(model, counts, usage, metadata.get("code_usage"), binarize)
    leakiness_result = _leakiness_results(samples, leak, train_info, progress)
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
        "leakiness_training": train_info,
        "leakiness_settings": dataclasses.asdict(leak),
    }


def _segmentation_summary(
    per_case: list[dict[str, Any]], suffix: str, min_lesion_ml: float
) -> dict[str, Any]:
    """Dice per class over all cases (the paper's table) and over the cases with a tumour, and the false
    tumour predicted in the healthy cases, from ``per_case``'s ``dice{suffix}`` and
    ``predicted_ml{suffix}``."""
    dice = f"dice{suffix}"
    healthy = [c for c in per_case if not c["tumour"]]
    out: dict[str, Any] = {name: _summary([c[dice][name] for c in per_case]) for name in ABNORMAL_DICE_GROUPS}
    out["min_lesion_ml"] = float(min_lesion_ml)
    out["tumour_cases"] = {
        name: _summary([c[dice][name] for c in per_case if c["tumour"]]) for name in ABNORMAL_DICE_GROUPS
    }
    volumes = [float(c[f"predicted_ml{suffix}"]) for c in healthy]
    out["healthy_cases"] = {
        "cases": len(healthy),
        "with_predicted_tumour": sum(v > 0 for v in volumes),
        "predicted_ml": _summary(volumes),
        "predicted_ml_max": max(volumes) if volumes else float("nan"),
    }
    return out


def _leakiness_results(
    samples: _LeakSamples,
    leak: LeakinessSettings,
    train_info: dict[str, Any] | None,
    progress: Progress | None,
) -> dict[str, Any]:
    """Both classifiers (normal-appearing and full reconstructions) on the collected samples."""
    if not samples.labels:
        nan_result = {
            "ppv": float("nan"),
            "auc": float("nan"),
            "note": "no brain slices in the evaluated cases",
        }
        return {"normal_appearing": nan_result, "full_control": dict(nan_result)}
    labels = np.concatenate(samples.labels)
    train_cases = None
    if train_info is not None:
        train_cases = sorted({c for c in samples.cases if c.startswith("train:")})
    out = {}
    for key, parts in (("normal_appearing", samples.normal), ("full_control", samples.full)):
        result = leakiness(
            np.concatenate(parts), labels, samples.cases, leak, progress, train_cases=train_cases
        )
        if train_info is None:
            result["note"] = "; ".join(n for n in (result.get("note"), SPLIT_NOTE) if n)
        elif train_info["evaluated_training_cases"]:
            left_out = ", ".join(train_info["evaluated_training_cases"][:10])
            extra = f"evaluated training case(s) left out of the classifier's test: {left_out}"
            result["note"] = "; ".join(n for n in (result.get("note"), extra) if n)
        out[key] = result
    return out


def binarization_summary(report: Any, fitted_on: str) -> dict[str, Any]:
    """The figures of a ``BinarizationReport`` that ``fdn eval-model`` reports, JSON-ready."""

    def conc(d: dict[int, float]) -> dict[str, float]:
        return {str(q): float(v) for q, v in d.items()}

    return {
        "fitted_on": fitted_on,
        "num_used": int(report.num_used),
        "bits_all_pairs": int(report.num_codes * (report.num_codes - 1) // 2),
        "bits_before": int(report.bits_before),
        "bits_after": int(report.bits_after),
        "share_of_all_pairs": float(report.bits_share_of_pairs),
        "compression_ratio": float(report.compression_ratio),
        "concordance_paper": conc(report.concordance_paper),
        "concordance_used": conc(report.concordance_used),
        "nearest_preserved": bool(report.nearest_preserved),
        "runtime_s": float(report.runtime_s),
    }


def _codebooks(
    model: Any,
    counts: dict[str, np.ndarray],
    training: tuple[np.ndarray, np.ndarray] | None,
    recorded: Any,
    binarize: bool,
) -> dict[str, Any]:
    """Per codebook: compactness (paper), usage on the evaluated data and in training, binarisation."""
    from fdn_core.codes.binarize import fit_binary_codes, used_codes

    out: dict[str, Any] = {}
    for i, which in enumerate(("normal", "abnormal")):
        book = model.codebook(which).detach().float().cpu().numpy()
        norms = np.linalg.norm(book.astype(np.float64), axis=1)
        data_usage = code_usage(counts[which])
        entry: dict[str, Any] = {
            "num_codes": int(book.shape[0]),
            "compactness": codebook_compactness(book),
            "zero_vectors": int((norms < COMPACTNESS_THRESHOLD).sum()),
            **data_usage,
            "unused_fraction": 1.0 - data_usage["used_fraction"],
            "training": None,
        }
        train_counts = None if training is None else training[i]
        if train_counts is not None and train_counts.sum() > 0:
            t = code_usage(train_counts)
            entry["training"] = {
                **t,
                "unused_fraction": 1.0 - t["used_fraction"],
                "window": recorded.get("window") if isinstance(recorded, dict) else None,
            }
        if binarize:
            mask = None if train_counts is None else used_codes(train_counts)
            where = "all K codes (no training usage recorded: the paper's way)"
            if mask is not None:
                where = f"the {int(mask.sum())} codes used in training (of {len(mask)})"
            codes = fit_binary_codes(book, used=mask)
            entry["binarization"] = binarization_summary(codes.report, where)
            log.info("%s codebook binarised: %s", which, codes.report.summary())
        out[which] = entry
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _conc(d: dict[str, float]) -> str:
    """Concordance values as "a/b/c" ("n/a" when empty)."""
    return "/".join(f"{v:.2f}" for v in d.values()) if d else "n/a"


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
        "A class absent from a case's labels counts 0 there when the model predicts it and is left out when",
        "it does not; a healthy case therefore scores 0 for any false tumour. Rows *tumour cases* leave the",
        "healthy cases out (as on BraTS, where every case has a tumour).",
        "",
        "| prediction | cases | NCR/NET | ED | ET | whole tumour |",
        "|---|---|---|---|---|---|",
    ]
    lines += _segmentation_lines(results["segmentation"])
    lines += [
        "",
        "## Codebooks (paper 4.4.4; usage on the evaluated data and, when recorded, in training)",
        "",
        "| codebook | compactness (norm < 1e-5) | codes used | share used | perplexity | unused | "
        "unused in training | perplexity in training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    binarized = []
    for which in ("normal", "abnormal"):
        s = results["codebooks"][which]
        unused = s.get("unused_fraction", 1.0 - s["used_fraction"])
        t = s.get("training") or {}
        lines.append(
            f"| {which} | {_fmt(s['compactness'])} | {s['used']} / {s['num_codes']} | "
            f"{_fmt(s['used_fraction'])} | {_fmt(s['perplexity'])} | {_fmt(unused)} | "
            f"{_fmt(t.get('unused_fraction', 'not recorded'))} | {_fmt(t.get('perplexity', 'n/a'))} |"
        )
        if s.get("binarization"):
            binarized.append((which, s["binarization"]))
    if binarized:
        lines += [
            "",
            "## Binarisation (paper 4.4.5; Algorithm A.1 as `fdn index` fits it)",
            "",
            "| codebook | fitted on | bits kept | % of K(K-1)/2 | concordance top-1/5/10, all K (paper) | "
            "concordance top-1/5/10, used codes only |",
            "|---|---|---|---|---|---|",
        ]
        for which, b in binarized:
            lines.append(
                f"| {which} | {b['fitted_on']} | {b['bits_after']} of {b['bits_all_pairs']} | "
                f"{100 * b['share_of_all_pairs']:.2f} % | {_conc(b['concordance_paper'])} | "
                f"{_conc(b['concordance_used'])} |"
            )
    lines += [
        "",
        "## Leakiness (paper 4.4.3; small CNN, held-out cases, balanced: 0.5 = chance, lower is better)",
        "",
        "| classifier input | PPV | AUC | accuracy | train / val / test slices | epochs (best) |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    protocol = results["leakiness"]["normal_appearing"].get("protocol")
    if protocol:
        notes.append(f"- protocol: {protocol}")
    for key, label in (
        ("normal_appearing", "normal-appearing x_hat-"),
        ("full_control", "full x_hat+ (control)"),
    ):
        s = results["leakiness"][key]
        counts = f"{s.get('n_train', 0)} / {s.get('n_val', 0)} / {s.get('n_test', 0)}"
        accuracy = _fmt(s.get("accuracy", float("nan")))
        epochs = f"{s['epochs_run']} ({s['best_epoch']})" if "epochs_run" in s else "-"
        lines.append(f"| {label} | {_fmt(s['ppv'])} | {_fmt(s['auc'])} | {accuracy} | {counts} | {epochs} |")
        if "note" in s:
            notes.append(f"- {label}: {s['note']}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _segmentation_lines(seg: dict[str, Any]) -> list[str]:
    """The Dice rows (post-processed and unprocessed; all cases and tumour cases) and the healthy cases'
    false tumour, for ``markdown_report``."""
    classes = ("ncr_net", "ed", "et", "whole_tumour")

    def row(label: str, group: str, block: dict[str, Any]) -> str:
        cells = [f"{_fmt(block[k]['mean'])} ± {_fmt(block[k]['std'])} (n {block[k]['n']})" for k in classes]
        return f"| {label} | {group} | " + " | ".join(cells) + " |"

    lines = []
    notes = ["", "False tumour in the healthy cases:", ""]
    for label, block in (
        (f"lesions >= {seg['min_lesion_ml']:g} mL", seg),
        ("unprocessed", seg["unprocessed"]),
    ):
        lines += [row(label, "all", block), row(label, "tumour cases", block["tumour_cases"])]
        h = block["healthy_cases"]
        notes.append(
            f"- {label}: {h['with_predicted_tumour']} of {h['cases']} healthy cases, "
            f"{_fmt(h['predicted_ml']['mean'])} mL on average (largest {_fmt(h['predicted_ml_max'])} mL)"
        )
    return lines + notes


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
