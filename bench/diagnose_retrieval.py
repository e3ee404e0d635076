"""Where does the FDN lose retrieval quality? Diagnostic rankings beside the FDN distances, the trivial
baselines and the oracle, under eval_unseen's protocol and scoring.

For each ``--cohort`` (a phantom cohort folder, e.g. one written by ``bench/eval_unseen.py``) the script
indexes it with the model (or reuses a complete database of it built with the same model: ``--db``, else the
cohort's sibling ``db_<seed>`` as eval_unseen writes it, else ``<out>/db_<name>``) and runs the library's
leave-one-out retrieval evaluation (``fdn_core.evaluation.retrieval_eval.evaluate_retrieval``: every tumour
volume's largest-tumour slice queries all the other volumes, volume-wise top-k, Dice scores, ratios to the
oracle), with these extra ranking methods plugged in through ``methods=`` (``RankingMethod``; each ranks per
similarity: S_normal by its normal term, S_abnormal by its abnormal term, S_sum by their sum, S_sum
normalised by each term over its median on random pairs of reference rows):

- ``GT masks at full resolution`` (ground truth, a diagnostic, not a method): L2 between the one-hot label
  maps of the query and reference slices at the model's resolution (normal term: anatomy labels 1-6,
  abnormal term: tumour classes 1-3). Its gap to the oracle is what an L2 ranking instead of Dice costs.
- ``GT masks at code resolution`` (ground truth, diagnostic): the same label maps average-pooled to the code
  grid (8x8) as per-class fractions, L2. The best any 8x8 description of anatomy / lesion could do with a
  perfect segmentation; its gap to the full-resolution row is what the code resolution costs.
- ``Model segmentation at code resolution``: the same with the FDN's predicted tumour segmentation (the
  segmentation decoder on the quantised abnormal codes, as ``InferenceBundle.encode_slices``) instead of the
  ground truth tumour; the FDN predicts no anatomy, so its normal term is the ground-truth anatomy (its
  S_normal equals the GT row's; S_abnormal and S_sum show what the segmentation errors cost).
- ``Model segmentation at G x G`` (``--seg-grids G ...``): the same soft Dice on the predicted segmentation
  pooled to finer grids (at the model's input size, its exact Dice). The decoded segmentation is a function
  of the abnormal codes alone, so these rows show what ranking by it could give (re-ranking a shortlist
  of the code search by it would differ).
- ``Continuous features``: L2 (the paper's Euclidean, as D_E on the codes) and cosine (as D_A) between the
  FDN's pre-quantisation encoder outputs z_e (normal / abnormal); against D_E / D_A on the codes they show
  what the vector quantisers cost. The codes recomputed from these z_e are compared with the database's.
- ``Code Dice D_D`` (with ``--train-data``; a method: codes only, plus per-code profiles learned on the
  model's TRAINING cohort, never on the evaluated one): every code c of each codebook gets a class-fraction
  profile f(c), the mean over the training slices' code cells that carry c of the cell's ground-truth class
  fractions (abnormal codes: tumour classes 1-3; normal codes: anatomy labels 1-6, which the phantoms have
  and BraTS does not), zeros for codes never seen. D_D between two code grids a, b is
  ``1 - 2 sum_j sum_cls min(f(a_j), f(b_j)) / (sum_j |f(a_j)|_1 + sum_j |f(b_j)|_1)`` (0 when both are
  empty): a K x K overlap table plus per-code masses, so table-lookup friendly. S_abnormal ranks by the
  abnormal codes' D_D, S_normal by the normal codes', S_sum by their sum, S_sum_normalized by each over its
  median on random pairs. A label-free variant learns the abnormal profile from the model's own predicted
  segmentation of the training cohort (its normal profile is the same anatomy one: no label-free anatomy).
  ``--profile-cache FILE`` keeps the learned profiles for the next run.
- ``Expected-overlap code Dice D_X`` (with ``--train-data``; codes plus tables learned on the training cohort,
  the normal ones from its anatomy labels): ``min(mean f(a), mean f(b))`` is not the expected overlap of two
  cells with codes a and b, so per class c the table ``T_c[a, b] = E[min(f_c(x), f_c(y))]`` over every pair of
  distinct training cells x, y carrying a and b (exact over all pairs, ``overlap_tables``) and the masses
  ``m_c(a)`` give ``1 - 2 sum_j T_c[a_j, b_j] / (sum_j m_c(a_j) + sum_j m_c(b_j))``, averaged over the classes
  with a non-zero denominator. A second row uses one table per code position (``position_overlap_tables``;
  entries with no pair there: the shared table). The training cells are kept in the profile cache
  (``--no-dx``, ``--no-dx-position`` drop the rows).

Prints and writes one table per cohort (ratio to the oracle of S_normal, S_abnormal, S_sum, S_sum_normalized
for every ranking) and an automatic reading of the steps, to ``<out>/diagnose_retrieval.{md,json}``; the full
evaluation of each cohort (mean Dice, ranking metrics) goes to ``<out>/eval_<name>/retrieval_eval.{md,json}``.
Exit status 0 when it ran, 2 on an error.

Run: ``python bench/diagnose_retrieval.py --model demo --cohort /work/eval/cohort_9101 --out
runs/diagnose_9101 --threads 1`` (add ``--train-data /work/data/train120`` for the code Dice rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fdn_core.data.preprocess import class_fractions
from fdn_core.evaluation.ranking import MethodKind, RankingContext, RankingMethod, Similarity
from fdn_core.labels import ABNORMAL_CLASSES, ANATOMY_CLASSES, PAPER_DISTANCES

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_unseen import _check_fingerprints, _progress, training_seeds

if TYPE_CHECKING:
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.data.readers import CaseFiles
    from fdn_core.evaluation.retrieval_eval import RetrievalEvaluation
    from fdn_core.model.bundle import InferenceBundle
    from fdn_core.progress import Progress

__all__ = [
    "COLUMNS",
    "CodeDice",
    "CodeProfiles",
    "ContinuousFeatures",
    "ExpectedDice",
    "FDNPass",
    "GroundTruthLabels",
    "MaskFractions",
    "OverlapTables",
    "class_fractions",
    "code_dice_distance",
    "code_dice_pairs",
    "code_profiles",
    "diagnosis_lines",
    "expected_dice_distance",
    "expected_dice_pairs",
    "label_l2",
    "learn_code_profiles",
    "main",
    "overlap_tables",
    "position_overlap_tables",
    "soft_dice_distance",
]

#: The similarities of the diagnostic table.
COLUMNS: tuple[str, ...] = ("S_normal", "S_abnormal", "S_sum", "S_sum_normalized")
#: Random reference pairs for the S_sum normalised scales (as the search engine's default).
SCALE_PAIRS = 4096
GT_NOTE = "ground truth: a diagnostic, not a method"
#: Where the code Dice rows' profiles come from, for their labels.
DD_NOTE = "codes + per-code profiles learned on the training cohort"
ANATOMY_NOTE = "normal profile from anatomy labels: phantoms have them, BraTS does not"
#: The same for the expected-overlap rows D_X.
DX_NOTE = "codes + expected-overlap tables learned on the training cohort"
DX_ANATOMY_NOTE = "normal tables from anatomy labels: phantoms have them, BraTS does not"
#: Targets of the reading (ratios to the oracle).
TARGETS = {"S_abnormal": 0.76, "S_normal": 0.90, "S_sum": 0.85}


# ------------------------------------------------------------------------------------------ label maps


def label_l2(query: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """(N,) L2 distances between the foreground one-hot maps of one label slice (S, S) and label slices
    (N, S, S): the square root of the number of pixels whose labels differ, counting 2 where both are
    foreground (two one-hot entries differ) and 1 where one is background."""
    q = np.asarray(query).reshape(1, -1)
    r = np.asarray(refs).reshape(np.asarray(refs).shape[0], -1)
    neq = r != q
    d2 = np.count_nonzero(neq & (q > 0), axis=1) + np.count_nonzero(neq & (r > 0), axis=1)
    return np.asarray(np.sqrt(d2.astype(np.float64)), dtype=np.float64)


def soft_dice_distance(
    query: np.ndarray, refs: np.ndarray, num_classes: int, pooled: bool = False
) -> np.ndarray:
    """(N,) 1 - soft multi-class Dice between per-class fractions (``class_fractions`` rows): per class,
    ``2 sum min(q, r) / (sum q + sum r)`` over the cells (the Dice the maps would have if they overlapped as
    much as their fractions allow in every cell; the exact Dice at full resolution), averaged over the classes
    present in either, 1.0 when neither has any (as ``fdn_core.evaluation.metrics``' multi-class Dice).
    ``pooled``: one Dice with the sums taken over classes and cells together (the code Dice D_D's formula;
    big classes weigh more), distance 0 when neither has any."""
    q = np.asarray(query, dtype=np.float64).reshape(1, num_classes, -1)
    r = np.asarray(refs, dtype=np.float64).reshape(np.asarray(refs).shape[0], num_classes, -1)
    inter = np.minimum(r, q).sum(axis=2)
    total = q.sum(axis=2) + r.sum(axis=2)
    if pooled:
        return _dice_from(inter.sum(axis=1), total.sum(axis=1))
    present = total > 0
    dice = np.divide(2.0 * inter, total, out=np.zeros_like(total), where=present)
    count = present.sum(axis=1)
    mean = np.where(count > 0, dice.sum(axis=1) / np.maximum(count, 1), 1.0)
    return np.asarray(1.0 - mean, dtype=np.float64)


class GroundTruthLabels:
    """Ground-truth label slices (anatomy, tumour) of the queries and of every database row, at the model's
    resolution, loaded once with the library's loader (``load_case`` + ``volume_to_slices``, as the
    evaluation itself scores them)."""

    def __init__(
        self,
        case_files: Callable[[str], CaseFiles],
        bundle: InferenceBundle,
        workers: int = 1,
        progress: Progress | None = None,
    ) -> None:
        self.case_files = case_files
        self.preprocess = bundle.preprocess
        self.workers = workers
        self.progress = progress
        self.arrays: dict[str, np.ndarray] = {}

    def load(self, ctx: RankingContext) -> dict[str, np.ndarray]:
        """``query_anat``, ``query_seg`` (Nq, S, S) and ``ref_anat``, ``ref_seg`` (N, S, S) uint8."""
        if self.arrays:
            return self.arrays
        from fdn_core.data.preprocess import volume_to_slices
        from fdn_core.data.readers import load_case, parallel_map
        from fdn_core.errors import DataError

        by_case: dict[str, list[int]] = {}
        for q, cid in enumerate(ctx.query_case_ids):
            by_case.setdefault(cid, []).append(q)
        vol_of = {c: i for i, c in enumerate(ctx.case_names)}
        cases = list(dict.fromkeys([*ctx.case_names, *by_case]))
        arrays: dict[str, np.ndarray] = {}

        def prepare(cid: str) -> tuple[str, Any]:
            return cid, volume_to_slices(load_case(self.case_files(cid)), self.preprocess)

        for i, (cid, stack) in enumerate(parallel_map(prepare, cases, self.workers)):
            if stack.seg is None or stack.anat is None:
                raise DataError(f"case {cid} lacks tumour or anatomy labels: the diagnostic needs both")
            if not arrays:
                size = stack.seg.shape[1:]
                for name, n in (("query", ctx.num_queries), ("ref", ctx.num_rows)):
                    for kind in ("anat", "seg"):
                        arrays[f"{name}_{kind}"] = np.zeros((n, *size), dtype=np.uint8)
            if cid in vol_of:
                v = vol_of[cid]
                lo, hi = int(ctx.volume_starts[v]), int(ctx.volume_starts[v + 1])
                ks = ctx.slice_indices[lo:hi]
                arrays["ref_anat"][lo:hi], arrays["ref_seg"][lo:hi] = stack.anat[ks], stack.seg[ks]
            for q in by_case.get(cid, []):
                k = ctx.query_slice[q]
                arrays["query_anat"][q], arrays["query_seg"][q] = stack.anat[k], stack.seg[k]
            if self.progress is not None:
                self.progress.update(i + 1, len(cases), "Loading ground-truth labels (diagnostic)")
        self.arrays = arrays
        return arrays


# ---------------------------------------------------------------------------------------- model pass


class FDNPass:
    """One pass of the FDN over every query slice and database slice, shared by the methods that need it:
    pre-quantisation encoder outputs z_e (normal, abnormal; flattened D*h*w), the code indices the
    quantisers give them, and the predicted tumour segmentation (the segmentation decoder on the quantised
    abnormal codes, argmax: what ``InferenceBundle.encode_slices`` returns)."""

    def __init__(self, bundle: InferenceBundle, batch_size: int = 32) -> None:
        self.bundle = bundle
        self.batch_size = batch_size
        self.queries: dict[int, dict[str, np.ndarray]] = {}
        self.refs: dict[int, dict[str, np.ndarray]] = {}
        self.seconds = 0.0

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """``z_normal``, ``z_abnormal`` float32 (n, D*h*w), ``idx_normal``, ``idx_abnormal`` (n, h*w) and
        ``seg`` uint8 (n, S, S) of model-input slices (n, 4, S, S)."""
        import torch

        from fdn_core.device import autocast_for

        t0 = time.perf_counter()
        model, device = self.bundle.model, self.bundle.device
        parts: list[dict[str, np.ndarray]] = []
        with torch.inference_mode():
            for lo in range(0, images.shape[0], self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[lo : lo + self.batch_size])).to(device)
                with autocast_for(device):
                    z_n, z_a = model.encode_latents(x)
                    idx_n, idx_a = model.vq_normal.indices(z_n), model.vq_abnormal.indices(z_a)
                    seg = model.seg_decoder(model.vq_abnormal.lookup(idx_a)).argmax(1)
                n = x.shape[0]
                parts.append(
                    {
                        "z_normal": z_n.float().reshape(n, -1).cpu().numpy(),
                        "z_abnormal": z_a.float().reshape(n, -1).cpu().numpy(),
                        "idx_normal": idx_n.reshape(n, -1).cpu().numpy().astype(np.int64),
                        "idx_abnormal": idx_a.reshape(n, -1).cpu().numpy().astype(np.int64),
                        "seg": seg.cpu().numpy().astype(np.uint8),
                    }
                )
        self.seconds += time.perf_counter() - t0
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def observe_query(self, q: int, images: np.ndarray, slice_index: int) -> None:
        """Run the model on query ``q``'s slice (once, whichever method asks first)."""
        if q not in self.queries:
            self.queries[q] = self.run(images[slice_index : slice_index + 1])

    def observe_reference(self, rows: slice, images: np.ndarray) -> None:
        """Run the model on the database ``rows`` (once)."""
        if int(rows.start) not in self.refs:
            self.refs[int(rows.start)] = self.run(images)

    def matrices(self, name: str, ctx: RankingContext) -> tuple[np.ndarray, np.ndarray]:
        """(queries (Nq, ...), references (N, ...)) of output ``name``, in query and row order."""
        from fdn_core.errors import DataError

        if len(self.queries) != ctx.num_queries:
            raise DataError(f"FDN pass: {len(self.queries)} queries seen, {ctx.num_queries} expected")
        ref = np.concatenate([self.refs[s][name] for s in sorted(self.refs)])
        if ref.shape[0] != ctx.num_rows:
            raise DataError(f"FDN pass: {ref.shape[0]} reference slices seen, {ctx.num_rows} expected")
        return np.concatenate([self.queries[q][name] for q in range(ctx.num_queries)]), ref

    def code_agreement(self, db: CodeDatabase, ctx: RankingContext) -> dict[str, float]:
        """Share of code positions where the codes recomputed here equal the database's, per code type."""
        out = {}
        for t, stored in (("normal", db.normal_codes), ("abnormal", db.abnormal_codes)):
            _, ref = self.matrices(f"idx_{t}", ctx)
            out[t] = float(np.mean(np.asarray(stored).reshape(ref.shape).astype(np.int64) == ref))
        return out


# ----------------------------------------------------------------------------------- ranking methods


class _TwoTermMethod(RankingMethod):
    """A per-similarity ranking from two distance terms (normal, abnormal), each (Nq, N): S_normal ranks by
    the normal term, S_abnormal by the abnormal term, S_sum by their sum, S_sum normalised by each term
    divided by its median over random pairs of distinct reference rows."""

    kind: MethodKind = "embedding"
    per_similarity = True

    def __init__(self) -> None:
        self._terms: dict[str, np.ndarray] = {}
        self._scales: dict[str, float] = {}

    def terms(self, ctx: RankingContext) -> dict[str, np.ndarray]:
        """``normal`` and ``abnormal`` (Nq, N) distances of every query to every database row."""
        raise NotImplementedError

    def pair_distances(self, t: str, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """(P,) distances of term ``t`` between reference rows ``i`` and ``j``."""
        raise NotImplementedError

    def scale(self, t: str, num_rows: int) -> float:
        """Median of term ``t`` over random pairs of distinct reference rows (mean if 0; 1 if both are)."""
        if t not in self._scales:
            value = 1.0
            if num_rows >= 2:
                rng = np.random.default_rng(0)
                i = rng.integers(0, num_rows, SCALE_PAIRS)
                j = rng.integers(0, num_rows - 1, SCALE_PAIRS)
                d = self.pair_distances(t, i, j + (j >= i))
                med = float(np.median(d))
                value = med if med > 0 else (float(d.mean()) if d.mean() > 0 else 1.0)
            self._scales[t] = value
        return self._scales[t]

    def rank(self, ctx: RankingContext, similarity: Similarity | None, draw: int) -> list[np.ndarray]:
        """Volume-wise top-k of every query by the term(s) of ``similarity``'s mode."""
        from fdn_core.errors import ConfigError

        assert similarity is not None
        if not self._terms:
            self._terms = self.terms(ctx)
        n, a = self._terms["normal"], self._terms["abnormal"]
        mode = similarity.mode
        if mode == "normal":
            dist = n
        elif mode == "abnormal":
            dist = a
        elif mode == "sum":
            dist = n + a
        elif mode == "sum_normalized":
            dist = n / self.scale("normal", ctx.num_rows) + a / self.scale("abnormal", ctx.num_rows)
        else:
            raise ConfigError(f"{self.key}: unknown search mode {mode!r}")
        return [ctx.volume_wise(dist[q], q) for q in range(ctx.num_queries)]


class MaskFractions(_TwoTermMethod):
    """Distances between label maps: anatomy (normal term) and tumour (abnormal term), ground truth or the
    model's predicted tumour, at full resolution (``grid`` None: L2 between one-hot maps) or pooled to
    ``grid`` as per-class fractions (``metric`` "l2", or "dice": 1 - soft Dice, ``soft_dice_distance``, or
    "pooled_dice": its class-pooled form, D_D's formula on the true fractions)."""

    def __init__(
        self,
        key: str,
        label: str,
        labels: GroundTruthLabels,
        grid: tuple[int, int] | None,
        model: FDNPass | None = None,
        metric: str = "l2",
    ) -> None:
        super().__init__()
        self.key, self.label = key, label
        self.labels, self.grid, self.model, self.metric = labels, grid, model, metric
        distance = {"dice": "1 - soft Dice", "pooled_dice": "1 - class-pooled soft Dice"}.get(metric, "L2")
        where = "full model resolution (one-hot maps)" if grid is None else f"{grid[0]}x{grid[1]} fractions"
        tumour = "the FDN's predicted tumour classes" if model else "ground-truth tumour classes 1-3"
        self.description = (
            f"{distance} between label maps at {where}: ground-truth anatomy labels 1-6 (normal term), "
            f"{tumour} (abnormal term); " + ("the model's segmentation, a diagnostic" if model else GT_NOTE)
        )
        self._ref: dict[str, np.ndarray] = {}

    def observe_query(self, q: int, images: np.ndarray, slice_index: int) -> None:
        """Let the shared FDN pass see the query (model segmentation only)."""
        if self.model is not None:
            self.model.observe_query(q, images, slice_index)

    def observe_reference(self, volume: int, rows: slice, images: np.ndarray) -> None:
        """Let the shared FDN pass see the reference slices (model segmentation only)."""
        if self.model is not None:
            self.model.observe_reference(rows, images)

    def _maps(self, ctx: RankingContext) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        arr = self.labels.load(ctx)
        seg = (arr["query_seg"], arr["ref_seg"])
        if self.model is not None:
            seg = self.model.matrices("seg", ctx)
        return {"normal": (arr["query_anat"], arr["ref_anat"]), "abnormal": seg}

    def terms(self, ctx: RankingContext) -> dict[str, np.ndarray]:
        """Both terms, (Nq, N) each."""
        from fdn_core.codes.embedding_index import EmbeddingIndex

        out = {}
        for t, (q, r) in self._maps(ctx).items():
            if self.grid is None:
                self._ref[t] = r
                out[t] = np.stack([label_l2(q[i], r) for i in range(q.shape[0])])
            else:
                classes = ANATOMY_CLASSES if t == "normal" else ABNORMAL_CLASSES
                ref = class_fractions(r, classes, self.grid)
                self._ref[t] = ref
                qf = class_fractions(q, classes, self.grid)
                if self.metric in ("dice", "pooled_dice"):
                    pooled = self.metric == "pooled_dice"
                    out[t] = np.stack([soft_dice_distance(f, ref, len(classes), pooled) for f in qf])
                else:
                    out[t] = EmbeddingIndex(ref, "l2", backend="numpy").distances(qf)
        return out

    def pair_distances(self, t: str, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Distances of term ``t`` between reference rows ``i`` and ``j``."""
        ref = self._ref[t]
        if self.grid is None:
            return np.asarray([label_l2(ref[a], ref[b : b + 1])[0] for a, b in zip(i, j)])
        if self.metric in ("dice", "pooled_dice"):
            c = len(ANATOMY_CLASSES if t == "normal" else ABNORMAL_CLASSES)
            pooled = self.metric == "pooled_dice"
            return np.asarray(
                [soft_dice_distance(ref[a], ref[b : b + 1], c, pooled)[0] for a, b in zip(i, j)]
            )
        return np.asarray(np.linalg.norm(ref[i] - ref[j], axis=1), dtype=np.float64)


class ContinuousFeatures(_TwoTermMethod):
    """The FDN's pre-quantisation encoder outputs z_e (normal term: z_e-, abnormal term: z_e+), flattened,
    compared by ``metric`` "l2" (as D_E on the quantised codes) or "cosine" (as D_A)."""

    def __init__(self, model: FDNPass, metric: str) -> None:
        super().__init__()
        self.model, self.metric = model, metric
        name = {"l2": "L2, as D_E", "cosine": "cosine, as D_A"}[metric]
        self.key = f"continuous_{metric}"
        self.label = f"Continuous features z_e ({name}; before the quantisers)"
        self.description = (
            f"{metric} distance between the FDN's flattened pre-quantisation encoder outputs (normal / "
            "abnormal), the same distance as the code search's but without the vector quantisers"
        )
        self._ref: dict[str, np.ndarray] = {}

    def observe_query(self, q: int, images: np.ndarray, slice_index: int) -> None:
        """Let the shared FDN pass see the query."""
        self.model.observe_query(q, images, slice_index)

    def observe_reference(self, volume: int, rows: slice, images: np.ndarray) -> None:
        """Let the shared FDN pass see the reference slices."""
        self.model.observe_reference(rows, images)

    def terms(self, ctx: RankingContext) -> dict[str, np.ndarray]:
        """Both terms, (Nq, N) each."""
        from fdn_core.codes.embedding_index import EmbeddingIndex

        out = {}
        for t in ("normal", "abnormal"):
            q, ref = self.model.matrices(f"z_{t}", ctx)
            q, ref = q.astype(np.float64), ref.astype(np.float64)
            self._ref[t] = ref
            out[t] = EmbeddingIndex(ref, self.metric, backend="numpy").distances(q)
        return out

    def pair_distances(self, t: str, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Distances of term ``t`` between reference rows ``i`` and ``j``."""
        a, b = self._ref[t][i], self._ref[t][j]
        if self.metric == "l2":
            return np.asarray(np.linalg.norm(a - b, axis=1), dtype=np.float64)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        cos = np.divide((a * b).sum(axis=1), na * nb, out=np.zeros(a.shape[0]), where=na * nb > 0)
        return np.asarray(1.0 - cos, dtype=np.float64)


# ------------------------------------------------------------------------------------------ code Dice


def code_profiles(codes: np.ndarray, fractions: np.ndarray, num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-code class-fraction profiles: ``codes`` (n, P) code indices of n grids of P cells, ``fractions``
    (n, C, P) the class fractions of the same cells (``class_fractions`` rows reshaped); returns (``profile``
    (K, C): per code, the mean fractions over the cells that carry it, zeros for a code never seen;
    ``counts`` (K,) int64: how many cells carry each code)."""
    sums, counts = _profile_sums(codes, fractions, num_codes)
    return _profile_means(sums, counts), counts


def _profile_sums(codes: np.ndarray, fractions: np.ndarray, num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    from fdn_core.errors import DataError

    idx = np.asarray(codes, dtype=np.int64).reshape(-1)
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.ndim != 3 or frac.shape[0] * frac.shape[2] != idx.size:
        raise DataError(f"code profiles: fractions {frac.shape} do not match codes {np.shape(codes)}")
    if idx.size and (idx.min() < 0 or idx.max() >= num_codes):
        raise DataError(f"code profiles: code indices outside 0..{num_codes - 1}")
    per_class = frac.transpose(1, 0, 2).reshape(frac.shape[1], -1)
    sums = np.stack([np.bincount(idx, weights=w, minlength=num_codes) for w in per_class], axis=1)
    return sums, np.bincount(idx, minlength=num_codes).astype(np.int64)


def _profile_means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    means = np.divide(sums, counts[:, None], out=np.zeros_like(sums), where=counts[:, None] > 0)
    return np.asarray(means, dtype=np.float64)


def _overlap_table(profile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, K) ``sum_cls min(f(a), f(b))`` of every pair of codes, and (K,) masses ``|f(c)|_1``."""
    f = np.asarray(profile, dtype=np.float64)
    return np.minimum(f[:, None, :], f[None, :, :]).sum(axis=2), f.sum(axis=1)


def _dice_from(inter: np.ndarray, total: np.ndarray) -> np.ndarray:
    """1 - 2 inter / total; 0 where total is 0 (both grids empty; one empty side gives 1 by the formula)."""
    ratio = np.divide(2.0 * inter, total, out=np.zeros_like(total), where=total > 0)
    return np.asarray(np.where(total > 0, 1.0 - ratio, 0.0), dtype=np.float64)


def code_dice_distance(
    queries: np.ndarray, refs: np.ndarray, profile: np.ndarray, per_class: bool = False
) -> np.ndarray:
    """(Nq, N) code Dice D_D between query code grids ``queries`` (Nq, P) and reference grids ``refs``
    (N, P) of one code type, with the per-code profiles ``profile`` (K, C): ``1 - 2 sum_j sum_cls
    min(f(a_j), f(b_j)) / (sum_j |f(a_j)|_1 + sum_j |f(b_j)|_1)``, 0 when both grids are empty. Per position
    j it is a lookup of the query code's row of the K x K overlap table (as a table-lookup search would).
    ``per_class``: one such Dice per class (C tables), averaged over the classes present in either grid (as
    ``soft_dice_distance``; the protocol's multi-class Dice weighs every class alike)."""
    from fdn_core.errors import DataError

    q = np.asarray(queries, dtype=np.int64)
    r = np.asarray(refs, dtype=np.int64)
    k = np.asarray(profile).shape[0]
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise DataError(f"code Dice: query grids {q.shape} and reference grids {r.shape} do not match")
    for a in (q, r):
        if a.size and (a.min() < 0 or a.max() >= k):
            raise DataError(f"code Dice: code indices outside 0..{k - 1}")
    if per_class:
        f = np.asarray(profile, dtype=np.float64)
        dice = [code_dice_distance(q, r, f[:, c : c + 1]) for c in range(f.shape[1])]
        total = [f[q, c].sum(axis=1)[:, None] + f[r, c].sum(axis=1)[None, :] for c in range(f.shape[1])]
        return _class_mean(np.stack(dice), np.stack(total))
    overlap, mass = _overlap_table(profile)
    inter = np.zeros((q.shape[0], r.shape[0]), dtype=np.float64)
    for j in range(q.shape[1]):
        inter += overlap[q[:, j]][:, r[:, j]]
    total = mass[q].sum(axis=1)[:, None] + mass[r].sum(axis=1)[None, :]
    return _dice_from(inter, total)


def _class_mean(dist: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Per-class distances (C, ...) averaged over the classes present (total > 0); 0 where none is."""
    present = total > 0
    count = present.sum(axis=0)
    mean = np.where(present, dist, 0.0).sum(axis=0) / np.maximum(count, 1)
    return np.asarray(np.where(count > 0, mean, 0.0), dtype=np.float64)


def code_dice_pairs(a: np.ndarray, b: np.ndarray, profile: np.ndarray, per_class: bool = False) -> np.ndarray:
    """(M,) code Dice D_D between grids ``a[m]`` and ``b[m]`` (M, P) each (``code_dice_distance``, paired)."""
    ia, ib = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if per_class:
        f = np.asarray(profile, dtype=np.float64)
        dice = [code_dice_pairs(ia, ib, f[:, c : c + 1]) for c in range(f.shape[1])]
        total = [f[ia, c].sum(axis=1) + f[ib, c].sum(axis=1) for c in range(f.shape[1])]
        return _class_mean(np.stack(dice), np.stack(total))
    overlap, mass = _overlap_table(profile)
    inter = overlap[ia, ib].sum(axis=1)
    return _dice_from(inter, mass[ia].sum(axis=1) + mass[ib].sum(axis=1))


class CodeProfiles:
    """Per-code class-fraction profiles learned on a training cohort: ``normal`` (K, anatomy classes) of the
    normal codes from ground-truth anatomy, ``abnormal`` (K, tumour classes) of the abnormal codes from
    ground-truth tumour, ``abnormal_model`` the same from the model's own predicted segmentation (label-free),
    ``counts_normal`` / ``counts_abnormal`` (K,) cells per code, and where they came from (``meta``)."""

    ARRAYS = ("normal", "abnormal", "abnormal_model", "counts_normal", "counts_abnormal")
    #: The training cells themselves, for the expected-overlap tables of D_X: per slice and code position the
    #: normal / abnormal code (n, P) and the class pixel counts of the cell (n, C, P; fraction x
    #: ``cell_levels``, the pixels per cell), anatomy 1-6 and tumour 1-3. Optional (older caches lack them).
    CELL_ARRAYS = ("cells_normal", "cells_abnormal", "cells_anat", "cells_seg", "cell_levels")

    def __init__(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        self.arrays = {k: np.asarray(arrays[k]) for k in (*self.ARRAYS, *self.CELL_ARRAYS) if k in arrays}
        self.meta = dict(meta)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def has_cells(self) -> bool:
        """Whether the training cells (for D_X's tables) are kept."""
        return all(k in self.arrays for k in self.CELL_ARRAYS)

    def save(self, path: Path) -> None:
        """Write the profiles and their provenance to ``path`` (.npz; the meta as JSON inside)."""
        import io

        from fdn_core.fileio import atomic_write_bytes

        buf = io.BytesIO()
        arrays: dict[str, Any] = {"meta": np.asarray(json.dumps(self.meta, sort_keys=True)), **self.arrays}
        np.savez(buf, **arrays)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path, expect: Mapping[str, Any], need_cells: bool = False) -> CodeProfiles | None:
        """The profiles saved at ``path`` if its meta matches ``expect`` (model, cases) and, with
        ``need_cells``, it keeps the training cells; else None."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {k: data[k] for k in (*cls.ARRAYS, *cls.CELL_ARRAYS) if k in data.files}
        except (OSError, KeyError, ValueError):
            return None
        if any(meta.get(k) != v for k, v in expect.items()) or any(k not in arrays for k in cls.ARRAYS):
            return None
        profiles = cls(arrays, meta)
        return None if need_cells and not profiles.has_cells else profiles

    def summary(self) -> str:
        """One line: cohort, cells, codes seen, learning time."""
        m = self.meta
        seen_n = int(np.count_nonzero(self["counts_normal"]))
        seen_a = int(np.count_nonzero(self["counts_abnormal"]))
        k = self["counts_normal"].size
        return (
            f"code profiles learned on {m['train_data']} ({m['num_cases']} cases, seed {m.get('seed')}, "
            f"{m['num_slices']} slices; {m['in_model_train_cases']} of them in the model's recorded training "
            f"cases): normal codes seen {seen_n}/{k}, abnormal {seen_a}/{k}; learning took "
            f"{m['seconds']:.0f} s" + (" (cached)" if m.get("cached") else "")
        )


def _cohort_seed(folder: Path) -> int | None:
    meta = folder / "cohort.json"
    try:
        seed = json.loads(meta.read_text()).get("seed") if meta.is_file() else None
    except (OSError, ValueError):
        return None
    return int(seed) if isinstance(seed, int) else None


def _cell_levels(size: tuple[int, ...], grid: tuple[int, int]) -> int:
    """Pixels per code cell when the label size divides into the grid (fractions are then exact multiples of
    1 / levels); else 4096 (the fractions are rounded to that many levels)."""
    if len(size) == 2 and size[0] % grid[0] == 0 and size[1] % grid[1] == 0:
        return int((size[0] // grid[0]) * (size[1] // grid[1]))
    return 4096


def learn_code_profiles(
    bundle: InferenceBundle,
    train_data: Path,
    workers: int = 1,
    progress: Progress | None = None,
    cache: Path | None = None,
    need_cells: bool = False,
) -> CodeProfiles:
    """Encode every slice of the training cohort ``train_data`` as the database does (``volume_to_slices``
    with the bundle's preprocessing, ``InferenceBundle.encode_slices``), pool its ground-truth anatomy and
    tumour labels and the model's predicted tumour to the code grid (``class_fractions``) and average them
    per code (``code_profiles``); keeps the training cells (codes and class pixel counts, ``CodeProfiles
    .CELL_ARRAYS``) for D_X's expected-overlap tables. ``cache``: reuse the profiles saved there for the same
    model and cases (``need_cells``: only if it keeps the cells too), and save them there after learning."""
    from fdn_core.data.preprocess import volume_to_slices
    from fdn_core.data.readers import find_cases, load_case, parallel_map
    from fdn_core.errors import ConfigError, DataError

    if not train_data.is_dir():
        raise ConfigError(
            f"--train-data {train_data}: no such folder (the model's training cohort is needed)"
        )
    cases = list(find_cases(train_data))
    if not cases:
        raise ConfigError(f"--train-data {train_data}: no cases found")
    expect = {
        "fingerprint": bundle.fingerprint,
        "train_data": str(train_data.resolve()),
        "cases": sorted(c.case_id for c in cases),
    }
    if cache is not None and cache.is_file():
        cached = CodeProfiles.load(cache, expect, need_cells=need_cells)
        if cached is not None:
            cached.meta["cached"] = str(cache)
            return cached
    t0 = time.perf_counter()
    grid = bundle.grid_shape
    k = int(bundle.config.num_codes)
    groups = {"normal": ANATOMY_CLASSES, "abnormal": ABNORMAL_CLASSES, "abnormal_model": ABNORMAL_CLASSES}
    sums = {t: np.zeros((k, len(c))) for t, c in groups.items()}
    counts = {t: np.zeros(k, dtype=np.int64) for t in ("normal", "abnormal")}
    slices = 0
    cells: dict[str, list[np.ndarray]] = {k: [] for k in CodeProfiles.CELL_ARRAYS[:-1]}
    levels = 0

    def prepare(f: CaseFiles) -> tuple[str, Any]:
        return f.case_id, volume_to_slices(load_case(f), bundle.preprocess)

    for i, (cid, stack) in enumerate(parallel_map(prepare, cases, workers)):
        if stack.seg is None or stack.anat is None:
            raise DataError(f"training case {cid} lacks tumour or anatomy labels: the profiles need both")
        enc = bundle.encode_slices(stack.images)
        n = enc.normal.shape[0]
        slices += n
        maps = {"normal": stack.anat, "abnormal": stack.seg, "abnormal_model": enc.seg}
        for t, classes in groups.items():
            codes = (enc.normal if t == "normal" else enc.abnormal).reshape(n, -1)
            frac = class_fractions(maps[t], classes, grid).reshape(n, len(classes), -1)
            s, c = _profile_sums(codes, frac, k)
            sums[t] += s
            if t in counts:
                counts[t] += c
                if not levels:
                    levels = _cell_levels(maps[t].shape[1:], grid)
                cells[f"cells_{t}"].append(codes.astype(np.int16))
                pix = np.rint(frac * levels).astype(np.uint16)
                cells["cells_anat" if t == "normal" else "cells_seg"].append(pix)
        if progress is not None:
            progress.update(i + 1, len(cases), "Learning code profiles on the training cohort")
    trained = set(bundle.metadata.get("train_cases") or [])
    arrays = {
        "normal": _profile_means(sums["normal"], counts["normal"]),
        "abnormal": _profile_means(sums["abnormal"], counts["abnormal"]),
        "abnormal_model": _profile_means(sums["abnormal_model"], counts["abnormal"]),
        "counts_normal": counts["normal"],
        "counts_abnormal": counts["abnormal"],
        **{name: np.concatenate(parts) for name, parts in cells.items()},
        "cell_levels": np.asarray(levels, dtype=np.int64),
    }
    meta = {
        **expect,
        "seed": _cohort_seed(train_data),
        "num_cases": len(cases),
        "num_slices": slices,
        "in_model_train_cases": sum(c.case_id in trained for c in cases) if trained else "n/a",
        "seconds": time.perf_counter() - t0,
    }
    profiles = CodeProfiles(arrays, meta)
    if cache is not None:
        profiles.save(cache)
    return profiles


# ---------------------------------------------------------------------------- expected-overlap tables


def overlap_tables(
    codes: np.ndarray, counts: np.ndarray, num_codes: int, levels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expected-overlap tables of one code type from training cells: ``codes`` (M,) the cells' codes,
    ``counts`` (M, C) their class pixel counts (fraction x ``levels``, integers 0..levels). Returns
    (``tables`` (C, K, K): ``T_c[a, b]``, the mean of ``min(f_c(x), f_c(y))`` over every pair of distinct
    cells x, y carrying codes a and b, exact over all pairs (``min(x, y) = sum_l [x >= l][y >= l]`` on integer
    counts, so one product of the per-code survival counts), symmetric; entries with no pair (a code never
    seen, or a = b seen once) fall back to ``min(m_c(a), m_c(b))``, D_D's per-class overlap;
    ``means`` (K, C): ``m_c(a)``, the mean fraction of the cells carrying a (0 if none);
    ``pairs`` (K, K) int64: how many cell pairs each entry averages)."""
    from fdn_core.errors import DataError

    idx = np.asarray(codes, dtype=np.int64).reshape(-1)
    cnt = np.asarray(counts, dtype=np.int64).reshape(idx.size, -1)
    k, lv = int(num_codes), int(levels)
    if idx.size and (idx.min() < 0 or idx.max() >= k):
        raise DataError(f"overlap tables: code indices outside 0..{k - 1}")
    if cnt.size and (cnt.min() < 0 or cnt.max() > lv):
        raise DataError(f"overlap tables: cell counts outside 0..{lv}")
    n = np.bincount(idx, minlength=k).astype(np.int64)
    pairs = n[:, None] * n[None, :] - np.diag(n)
    seen = np.flatnonzero(n)
    tables = np.empty((cnt.shape[1], k, k), dtype=np.float64)
    means = np.zeros((k, cnt.shape[1]), dtype=np.float64)
    for c in range(cnt.shape[1]):
        hist = np.bincount(idx * (lv + 1) + cnt[:, c], minlength=k * (lv + 1)).reshape(k, lv + 1)
        surv = np.cumsum(hist[seen, ::-1], axis=1)[:, ::-1][:, 1:].astype(np.float64)  # cells >= l, l = 1..L
        mass = surv.sum(axis=1)  # the summed counts of each seen code's cells
        means[seen, c] = mass / n[seen] / lv
        m = means[:, c]
        table = np.minimum(m[:, None], m[None, :])
        inter = surv @ surv.T
        inter[np.diag_indices(seen.size)] -= mass  # drop each cell paired with itself
        sub = pairs[np.ix_(seen, seen)]
        table[np.ix_(seen, seen)] = np.where(
            sub > 0, inter / np.maximum(sub, 1) / lv, table[np.ix_(seen, seen)]
        )
        tables[c] = table
    return tables, means, pairs


def position_overlap_tables(
    codes: np.ndarray,
    counts: np.ndarray,
    num_codes: int,
    levels: int,
    fallback: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Position-dependent ``overlap_tables``: ``codes`` (n, P) and ``counts`` (n, C, P) of n training grids;
    one table per code position j from the cells at j only. Returns (``tables`` (P, C, K, K) float32,
    ``means`` (P, K, C), ``pairs`` (P, K, K)); entries with no pair at j fall back to the
    position-independent ``fallback`` (tables (C, K, K), means (K, C)), as do the means of codes unseen
    at j."""
    q = np.asarray(codes, dtype=np.int64)
    cnt = np.asarray(counts)
    t_all, m_all = fallback
    num_pos, num_cls = q.shape[1], cnt.shape[1]
    tables = np.empty((num_pos, num_cls, num_codes, num_codes), dtype=np.float32)
    means = np.empty((num_pos, num_codes, num_cls), dtype=np.float64)
    pairs = np.empty((num_pos, num_codes, num_codes), dtype=np.int64)
    for j in range(num_pos):
        t_j, m_j, p_j = overlap_tables(q[:, j], cnt[:, :, j], num_codes, levels)
        tables[j] = np.where(p_j[None] > 0, t_j, t_all)
        seen = np.bincount(q[:, j], minlength=num_codes)[:, None] > 0
        means[j] = np.where(seen, m_j, m_all)
        pairs[j] = p_j
    return tables, means, pairs


def _lookup_index(tables: np.ndarray, num_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """(P', C, K, K) tables and, per code position, the table index (all 0 for one shared table)."""
    from fdn_core.errors import DataError

    tab = np.asarray(tables)
    tab = tab[None] if tab.ndim == 3 else tab
    if tab.shape[0] not in (1, num_pos):
        raise DataError(f"D_X: {tab.shape[0]} position tables for grids of {num_pos} positions")
    return tab, (np.arange(num_pos) if tab.shape[0] > 1 else np.zeros(num_pos, dtype=np.int64))


def expected_dice_distance(
    queries: np.ndarray, refs: np.ndarray, tables: np.ndarray, means: np.ndarray
) -> np.ndarray:
    """(Nq, N) expected-overlap code Dice D_X between query grids (Nq, P) and reference grids (N, P) of one
    code type: per class c, ``1 - 2 sum_j T_c[a_j, b_j] / (sum_j m_c(a_j) + sum_j m_c(b_j))``, averaged over
    the classes whose denominator is > 0, 0 where none is (D_D per class's conventions). ``tables`` (C, K, K)
    or per position (P, C, K, K), ``means`` (K, C) or (P, K, C) (``overlap_tables``,
    ``position_overlap_tables``): per position a lookup of the query code's table row."""
    from fdn_core.errors import DataError

    q = np.asarray(queries, dtype=np.int64)
    r = np.asarray(refs, dtype=np.int64)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise DataError(f"D_X: query grids {q.shape} and reference grids {r.shape} do not match")
    tab, pos = _lookup_index(tables, q.shape[1])
    mu = np.asarray(means, dtype=np.float64)
    mu = mu[None] if mu.ndim == 2 else mu
    k = tab.shape[-1]
    for a in (q, r):
        if a.size and (a.min() < 0 or a.max() >= k):
            raise DataError(f"D_X: code indices outside 0..{k - 1}")
    dice, total = [], []
    for c in range(tab.shape[1]):
        inter = np.zeros((q.shape[0], r.shape[0]), dtype=np.float64)
        for j in range(q.shape[1]):
            inter += tab[pos[j], c][q[:, j]][:, r[:, j]]
        tot = mu[pos[None, :], q, c].sum(axis=1)[:, None] + mu[pos[None, :], r, c].sum(axis=1)[None, :]
        dice.append(_dice_from(inter, tot))
        total.append(tot)
    return _class_mean(np.stack(dice), np.stack(total))


def expected_dice_pairs(a: np.ndarray, b: np.ndarray, tables: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(M,) D_X between grids ``a[m]`` and ``b[m]`` (M, P) each (``expected_dice_distance``, paired)."""
    ia, ib = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    tab, pos = _lookup_index(tables, ia.shape[1])
    mu = np.asarray(means, dtype=np.float64)
    mu = mu[None] if mu.ndim == 2 else mu
    dice, total = [], []
    for c in range(tab.shape[1]):
        inter = tab[pos[None, :], c, ia, ib].astype(np.float64).sum(axis=1)
        tot = mu[pos[None, :], ia, c].sum(axis=1) + mu[pos[None, :], ib, c].sum(axis=1)
        dice.append(_dice_from(inter, tot))
        total.append(tot)
    return _class_mean(np.stack(dice), np.stack(total))


class OverlapTables:
    """D_X's expected-overlap tables of both code types, learned from the training cells kept in
    ``CodeProfiles`` (normal codes: anatomy classes 1-6; abnormal codes: tumour classes 1-3): ``shared``
    (position-independent) and, with ``positions``, ``position`` (one table per code position), each
    ``{"normal": (tables, means), "abnormal": ...}``; ``stats`` the cell pairs behind the entries."""

    def __init__(self, profiles: CodeProfiles, positions: bool = True) -> None:
        from fdn_core.errors import DataError

        if not profiles.has_cells:
            raise DataError(
                "D_X tables need the training cells (relearn the code profiles, or drop the cache)"
            )
        t0 = time.perf_counter()
        k = int(profiles["normal"].shape[0])
        levels = int(profiles["cell_levels"])
        self.shared: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.position: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.stats: dict[str, dict[str, float]] = {}
        for t, lab in (("normal", "cells_anat"), ("abnormal", "cells_seg")):
            codes, counts = profiles[f"cells_{t}"], profiles[lab]
            num_cls = counts.shape[1]
            flat = counts.transpose(0, 2, 1).reshape(-1, num_cls)
            tables, means, pairs = overlap_tables(codes.reshape(-1), flat, k, levels)
            self.shared[t] = (tables, means)
            self.stats[f"{t}"] = _pair_stats(pairs)
            if positions:
                tp, mp, pp = position_overlap_tables(codes, counts, k, levels, (tables, means))
                self.position[t] = (tp, mp)
                self.stats[f"{t}_position"] = _pair_stats(pp)
        self.levels = levels
        self.seconds = time.perf_counter() - t0

    def summary(self) -> str:
        """One line: pairs per table entry (median, share never observed) and the build time."""
        parts = []
        for name, st in self.stats.items():
            t, _, pos = name.partition("_")
            parts.append(
                f"{t}{' per position' if pos else ''}: median {st['median_pairs']:.0f} cell pairs per entry, "
                f"{100 * st['never_observed']:.1f}% of {st['entries']:.0f} entries never observed"
            )
        return (
            f"D_X tables (exact means over all pairs of distinct training cells; entries with none: D_D's "
            f"min of mean profiles{', per position: the shared table' if self.position else ''}): "
            + "; ".join(parts)
            + f"; built in {self.seconds:.1f} s"
        )


def _pair_stats(pairs: np.ndarray) -> dict[str, float]:
    p = np.asarray(pairs)
    return {
        "entries": float(p.size),
        "median_pairs": float(np.median(p)),
        "never_observed": float(np.mean(p == 0)),
        "min_observed_pairs": float(p[p > 0].min()) if (p > 0).any() else 0.0,
    }


class CodeDice(_TwoTermMethod):
    """Code Dice D_D on the database's code grids (normal term: normal codes with the ``normal`` profile,
    abnormal term: abnormal codes with the ``abnormal`` profile); see ``code_dice_distance``."""

    def __init__(
        self,
        key: str,
        label: str,
        description: str,
        db: CodeDatabase,
        normal: np.ndarray,
        abnormal: np.ndarray,
        per_class: bool = False,
    ) -> None:
        super().__init__()
        self.key, self.label, self.description = key, label, description
        self.db, self.per_class = db, per_class
        self.profiles = {"normal": np.asarray(normal), "abnormal": np.asarray(abnormal)}
        self._ref: dict[str, np.ndarray] = {}
        self.seconds = 0.0

    def terms(self, ctx: RankingContext) -> dict[str, np.ndarray]:
        """Both terms, (Nq, N) each, from the queries' codes and the database's."""
        from fdn_core.errors import DataError

        t0 = time.perf_counter()
        out = {}
        for i, (t, stored) in enumerate(
            (("normal", self.db.normal_codes), ("abnormal", self.db.abnormal_codes))
        ):
            ref = np.asarray(stored).reshape(np.asarray(stored).shape[0], -1).astype(np.int64)
            if ref.shape[0] != ctx.num_rows:
                raise DataError(f"{self.key}: database has {ref.shape[0]} rows, {ctx.num_rows} expected")
            q = np.stack([np.asarray(c[i]).reshape(-1) for c in ctx.query_codes]).astype(np.int64)
            self._ref[t] = ref
            out[t] = self.distance(t, q, ref)
        self.seconds += time.perf_counter() - t0
        return out

    def distance(self, t: str, q: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """(Nq, N) distances of term ``t`` between query grids ``q`` and reference grids ``ref``."""
        return code_dice_distance(q, ref, self.profiles[t], self.per_class)

    def pairs(self, t: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(M,) distances of term ``t`` between grids ``a[m]`` and ``b[m]``."""
        return code_dice_pairs(a, b, self.profiles[t], self.per_class)

    def pair_distances(self, t: str, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Distances of term ``t`` between reference rows ``i`` and ``j``."""
        t0 = time.perf_counter()
        d = self.pairs(t, self._ref[t][i], self._ref[t][j])
        self.seconds += time.perf_counter() - t0
        return d


class ExpectedDice(CodeDice):
    """Expected-overlap code Dice D_X on the database's code grids (normal term: normal codes with the
    anatomy tables, abnormal term: abnormal codes with the tumour tables); see ``expected_dice_distance``."""

    def __init__(
        self,
        key: str,
        label: str,
        description: str,
        db: CodeDatabase,
        tables: Mapping[str, tuple[np.ndarray, np.ndarray]],
    ) -> None:
        super().__init__(key, label, description, db, tables["normal"][1], tables["abnormal"][1])
        self.tables = dict(tables)

    def distance(self, t: str, q: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """(Nq, N) D_X of term ``t``."""
        return expected_dice_distance(q, ref, *self.tables[t])

    def pairs(self, t: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(M,) D_X of term ``t``, paired."""
        return expected_dice_pairs(a, b, *self.tables[t])


def code_dice_methods(
    profiles: CodeProfiles, db: CodeDatabase, tables: OverlapTables | None = None
) -> list[CodeDice]:
    """The code Dice rows: profiles from the training cohort's ground truth, and the label-free variant
    (abnormal profile from the model's predicted segmentation of the training cohort); with ``tables`` the
    expected-overlap rows D_X (shared tables, and per position when they were built)."""
    src = f"{profiles.meta['train_data']} (seed {profiles.meta.get('seed')})"
    dx: list[CodeDice] = []
    if tables is not None:
        dx.append(
            ExpectedDice(
                "code_dice_expected",
                f"D_X expected-overlap code Dice ({DX_NOTE}: GT lesion / anatomy fractions; "
                f"{DX_ANATOMY_NOTE})",
                "per-class code Dice with expected overlaps: T_c[a, b] = E[min(f_c, f_c')] over pairs of "
                "training cells carrying codes a and b (all pairs of distinct cells of "
                f"{src}, any position), "
                "masses m_c(a) = mean f_c of the cells carrying a; abnormal codes with tumour classes 1-3, "
                f"normal codes with anatomy labels 1-6 ({DX_ANATOMY_NOTE})",
                db,
                tables.shared,
            )
        )
        if tables.position:
            dx.append(
                ExpectedDice(
                    "code_dice_expected_pos",
                    f"D_X expected-overlap code Dice, per position ({DX_NOTE}, one per code position: GT "
                    "lesion / anatomy fractions; anatomy labels)",
                    "D_X with one table per code position j (pairs of training cells at j only; entries "
                    "with no pair at j: the shared table)",
                    db,
                    tables.position,
                )
            )
    return [
        *dx,
        CodeDice(
            "code_dice",
            f"D_D code Dice ({DD_NOTE}: GT lesion / anatomy fractions; {ANATOMY_NOTE})",
            f"code Dice between code grids; per-code class-fraction profiles learned on the training cohort "
            f"{src}: abnormal codes from its ground-truth tumour classes 1-3, normal codes from its anatomy "
            f"labels 1-6 ({ANATOMY_NOTE})",
            db,
            profiles["normal"],
            profiles["abnormal"],
        ),
        CodeDice(
            "code_dice_modelseg",
            f"D_D code Dice, label-free lesion profile ({DD_NOTE}: the model's own segmentation; normal: as "
            "D_D, anatomy labels)",
            f"code Dice as D_D, but the abnormal codes' profiles come from the model's own predicted tumour "
            f"segmentation of the training cohort {src} (no labels); the normal profile is D_D's (anatomy "
            "labels: there is no label-free anatomy)",
            db,
            profiles["normal"],
            profiles["abnormal_model"],
        ),
        CodeDice(
            "code_dice_classmean",
            f"D_D code Dice, per-class mean ({DD_NOTE}: GT lesion / anatomy fractions; anatomy labels)",
            "code Dice as D_D (same profiles), but one Dice per class averaged over the classes present "
            "(C overlap tables) instead of one Dice pooled over the classes: the protocol's multi-class Dice "
            "weighs every class alike",
            db,
            profiles["normal"],
            profiles["abnormal"],
            per_class=True,
        ),
    ]


# ------------------------------------------------------------------------------------------- reading


def _ratios(summary: Mapping[str, Any], method: str) -> dict[str, float | None]:
    return {c: (summary.get(method, {}).get(c) or {}).get("ratio_to_oracle") for c in COLUMNS}


def _diff(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a - b:+.3f}"


def diagnosis_lines(summary: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The automatic reading: the step between each pair of rankings that isolates one stage, per
    similarity (differences of ratios to the oracle; negative = quality lost by that stage)."""
    r = {m: _ratios(summary, m) for m in summary}

    def best(keys: Sequence[str], col: str) -> tuple[str, float | None]:
        vals = [(r[k][col], k) for k in keys if k in r and r[k][col] is not None]
        if not vals:
            return "n/a", None
        v, k = max(vals, key=lambda t: t[0] or 0.0)
        return labels.get(k, k), v

    def step(title: str, a: str, b: str, cols: Sequence[str] = COLUMNS) -> str:
        cells = ", ".join(f"{c} {_diff(r.get(a, {}).get(c), r.get(b, {}).get(c))}" for c in cols)
        return f"{title}: {cells}"

    lines = [
        step(
            "code resolution (GT masks at 8x8, soft Dice vs the oracle: Dice at full resolution)",
            "gt_grid_dice",
            "oracle",
        ),
        step("distance at 8x8 (GT masks: L2 vs soft Dice on the same fractions)", "gt_grid", "gt_grid_dice"),
        step(
            "distance at full resolution (GT masks: L2 on one-hot maps vs the oracle's Dice)",
            "gt_full",
            "oracle",
        ),
        step(
            "segmentation, L2 at 8x8 (model segmentation vs GT masks; S_normal: GT anatomy in both)",
            "model_seg_grid",
            "gt_grid",
            ("S_abnormal", "S_sum"),
        ),
        step(
            "segmentation, soft Dice at 8x8 (model segmentation vs GT masks)",
            "model_seg_grid_dice",
            "gt_grid_dice",
            ("S_abnormal", "S_sum"),
        ),
        step("quantisation, Euclidean (D_E on codes vs L2 on continuous z_e)", "euclidean", "continuous_l2"),
        step(
            "quantisation, angular (D_A on codes vs cosine on continuous z_e)", "angular", "continuous_cosine"
        ),
    ]
    fdn = [k for k in PAPER_DISTANCES if k in r]  # the paper's distances (D_L has its own line)
    cont = [k for k in ("continuous_l2", "continuous_cosine") if k in r]
    for col in COLUMNS:
        fname, fval = best(fdn, col)
        cname, cval = best(cont, col)
        gval = r.get("gt_grid", {}).get(col)
        sval = r.get("model_seg_grid", {}).get(col)
        text = (
            f"{col}: best FDN code distance {fname} {_f(fval)}; best continuous {cname} {_f(cval)} "
            f"(codes vs continuous {_diff(fval, cval)}); model segmentation at 8x8 {_f(sval)} (best FDN vs "
            f"it {_diff(fval, sval)}); GT masks at 8x8 {_f(gval)} (best FDN vs it {_diff(fval, gval)})"
        )
        lines.append(text)
    if "learned" in r:
        for col in COLUMNS:
            fname, fval = best(fdn, col)
            lval = r["learned"].get(col)
            # S_abnormal: against the model's own segmentation; the other columns' anatomy term is GT
            ref, what = (
                ("model_seg_grid_dice", "the model's 8x8 segmentation by soft Dice")
                if col == "S_abnormal"
                else ("gt_grid_dice", "GT masks at 8x8 by soft Dice [GT]")
            )
            lines.append(
                f"{col}: learned distance D_L {_f(lval)} (vs best paper distance {fname} "
                f"{_diff(lval, fval)}; vs {what} {_diff(lval, r.get(ref, {}).get(col))})"
            )
    chain = [
        ("Oracle", "oracle"),
        ("GT 8x8 soft Dice", "gt_grid_dice"),
        ("GT 8x8 L2", "gt_grid"),
        ("model seg 8x8 L2", "model_seg_grid"),
    ]
    for col in ("S_abnormal", "S_normal"):
        parts = [f"{name} {_f(r.get(k, {}).get(col))}" for name, k in chain if k in r]
        parts.append(f"best continuous {_f(best(cont, col)[1])}")
        parts.append(f"best FDN code distance {_f(best(fdn, col)[1])}")
        if "code_dice" in r:
            parts.append(f"D_D code Dice {_f(r['code_dice'][col])}")
        if "code_dice_expected" in r:
            parts.append(f"D_X {_f(r['code_dice_expected'][col])}")
        lines.append(f"chain {col}: " + " -> ".join(parts))
    if "code_dice" in r:
        lines.append(
            step(
                "class pooling (GT masks at 8x8: class-pooled soft Dice, D_D's formula, vs per-class)",
                "gt_grid_pooled_dice",
                "gt_grid_dice",
            )
        )
        lines.append(
            step(
                "per-code profiles (D_D on codes vs the same class-pooled soft Dice on GT 8x8 fractions)",
                "code_dice",
                "gt_grid_pooled_dice",
            )
        )
        lines.append(
            step(
                "per-code profiles, per-class mean (D_D per-class vs GT 8x8 soft Dice)",
                "code_dice_classmean",
                "gt_grid_dice",
            )
        )
    if "code_dice_expected" in r:
        lines.append(
            step(
                "expected overlap (D_X vs D_D per-class: E[min] tables instead of the min of mean profiles)",
                "code_dice_expected",
                "code_dice_classmean",
            )
        )
        lines.append(
            step("expected-overlap tables (D_X vs GT 8x8 soft Dice)", "code_dice_expected", "gt_grid_dice")
        )
    if "code_dice_expected_pos" in r:
        lines.append(
            step(
                "per-position tables (D_X per position vs D_X)",
                "code_dice_expected_pos",
                "code_dice_expected",
            )
        )
    for key in ("code_dice", "code_dice_classmean", "code_dice_modelseg", "code_dice_expected",
                "code_dice_expected_pos"):  # fmt: skip
        if key in r:
            lines.append(target_line(r, key, labels, best(fdn, "S_abnormal")[1], best(fdn, "S_normal")[1]))
    return lines


def target_line(
    r: Mapping[str, Mapping[str, float | None]],
    key: str,
    labels: Mapping[str, str],
    fdn_abnormal: float | None = None,
    fdn_normal: float | None = None,
) -> str:
    """Whether ranking ``key`` meets the targets: S_abnormal >= 0.76 and >= 2x the best trivial baseline,
    S_normal >= 0.90 and >= the level prior + 0.10, S_sum >= 0.85 (S_sum_normalized shown beside it)."""
    v = r[key]
    base = [(r[b]["S_abnormal"], b) for b in ("random", "level_prior", "pooled_pixels") if b in r]
    base = [(x, b) for x, b in base if x is not None]
    bval, bkey = max(base) if base else (None, "n/a")
    prior = r.get("level_prior", {}).get("S_normal")

    def ok(x: float | None, *bounds: float | None) -> str:
        if x is None or any(b is None for b in bounds):
            return "n/a"
        return "yes" if all(x >= b for b in bounds if b is not None) else "NO"

    a, n, sm, sn = (v.get(c) for c in ("S_abnormal", "S_normal", "S_sum", "S_sum_normalized"))
    twice = None if bval is None else 2 * bval
    prior_plus = None if prior is None else prior + 0.10
    name = labels.get(key, key).split(" (")[0]
    return (
        f"targets {name}: S_abnormal {_f(a)} (>= {TARGETS['S_abnormal']:.2f} and "
        f">= 2x best trivial baseline {labels.get(bkey, bkey).split(' (')[0]} = {_f(twice)}: "
        f"{ok(a, TARGETS['S_abnormal'], twice)}; vs best FDN code distance {_diff(a, fdn_abnormal)}); "
        f"S_normal {_f(n)} (>= {TARGETS['S_normal']:.2f} and >= level prior + 0.10 = {_f(prior_plus)}: "
        f"{ok(n, TARGETS['S_normal'], prior_plus)}; vs best FDN {_diff(n, fdn_normal)}); "
        f"S_sum {_f(sm)} (>= {TARGETS['S_sum']:.2f}: {ok(sm, TARGETS['S_sum'])}); "
        f"S_sum_normalized {_f(sn)} (>= {TARGETS['S_sum']:.2f}: {ok(sn, TARGETS['S_sum'])})"
    )


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def table_lines(result: RetrievalEvaluation) -> list[str]:
    """Markdown table: every ranking's ratio to the oracle for ``COLUMNS``."""
    from fdn_core.evaluation.retrieval_eval import ordered_methods

    summary = result.summary()
    lines = ["| Ranking | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for m in ordered_methods(result, summary):
        info = result.info(m)
        label = info.label + (f" [{info.draws} draws]" if info.draws > 1 else "")
        cells = []
        for c in COLUMNS:
            e = summary[m].get(c) or {}
            cell = _f(e.get("ratio_to_oracle"))
            if e.get("ratio_draw_std") is not None:
                cell += f" ± {e['ratio_draw_std']:.3f}"
            if m.startswith("model_seg") and c == "S_normal":
                cell += " (GT anatomy)"
            if m == "code_dice_modelseg" and c == "S_normal":
                cell += " (= D_D)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------------------------- run


def _database(bundle: InferenceBundle, cohort: Path, out: Path, args: argparse.Namespace) -> Path:
    """A complete database of ``cohort`` built with this model: ``--db``, the cohort's sibling
    ``db_<seed>`` (eval_unseen's layout) or one built under ``out``."""
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.data.readers import find_cases
    from fdn_core.errors import ConfigError, FDNError
    from fdn_core.retrieval import index_cohort

    ids = sorted(c.case_id for c in find_cases(cohort))
    suffix = cohort.name.removeprefix("cohort_")
    candidates = [Path(args.db)] if args.db else [cohort.parent / f"db_{suffix}", out / f"db_{cohort.name}"]
    for path in candidates:
        if not (path / "manifest.json").is_file():
            if args.db:
                raise ConfigError(f"--db {path}: no code database there (manifest.json missing)")
            continue
        try:
            db = CodeDatabase.open(path, expected_fingerprint=bundle.fingerprint)
        except FDNError as exc:
            if args.db:
                raise
            print(f"   not reusing {path} ({exc})", flush=True)
            continue
        if sorted(db.cases) == ids:
            print(f"   reusing {path}", flush=True)
            return path
        if args.db:
            raise ConfigError(f"--db {path} does not hold exactly the cases of {cohort}")
        print(f"   not reusing {path} (other cases)", flush=True)
    path = out / f"db_{cohort.name}"
    print(f"   indexing {cohort} into {path}", flush=True)
    index_cohort(
        bundle, cohort, path, progress=_progress(args.no_progress), overwrite=True, workers=args.workers
    )
    return path


def _check_unseen(bundle: InferenceBundle, cohort: Path) -> str:
    """Refuse the training cohort (by the seed in ``cohort.json`` or by case fingerprints, as eval_unseen
    does); say what was checked."""
    from fdn_core.errors import ConfigError

    seeds, _ = training_seeds(bundle, None)
    seed = _cohort_seed(cohort)
    if seed is not None and seed in seeds:
        raise ConfigError(f"{cohort} is phantom seed {seed}, the model's training cohort: not unseen data")
    said = [f"phantom seed {seed}" if seed is not None else "no cohort.json seed"]
    said.append(f"training seed(s) {seeds}" if seeds else "training seed unknown")
    said.append(_check_fingerprints(bundle, cohort, seed))
    return "; ".join(said)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, int(numba.config.NUMBA_NUM_THREADS)))
    except ImportError:  # the engine falls back to torch
        pass


def _check_profile_source(bundle: InferenceBundle, profiles: CodeProfiles, cohort: Path) -> str:
    """Refuse to evaluate the cohort the code profiles were learned on (its labels would leak into the
    ranking); say whether the profiles come from the model's own training cohort."""
    from fdn_core.data.provenance import training_cohort_seeds
    from fdn_core.errors import ConfigError

    train = Path(profiles.meta["train_data"])
    seed, own = profiles.meta.get("seed"), _cohort_seed(cohort)
    if cohort.resolve() == train or (seed is not None and seed == own):
        raise ConfigError(
            f"{cohort} is the cohort the code profiles were learned on ({train}, seed {seed}): the profiles "
            "must come from other (training) data"
        )
    seeds = training_cohort_seeds(bundle.metadata)
    if seeds and seed not in seeds:
        return f"profiles from phantom seed {seed}, NOT the model's training cohort (seed(s) {seeds})"
    return f"profiles from phantom seed {seed}" + (" = the model's training cohort" if seeds else "")


def diagnose_cohort(
    bundle: InferenceBundle,
    cohort: Path,
    out: Path,
    args: argparse.Namespace,
    profiles: CodeProfiles | None = None,
    tables: OverlapTables | None = None,
) -> dict[str, Any]:
    """Evaluate one cohort with the diagnostic rankings (and the code Dice rows when ``profiles`` are
    given, D_X's with ``tables``); returns its report entry (with the markdown)."""
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.data.readers import CaseFiles, find_cases
    from fdn_core.errors import ConfigError
    from fdn_core.evaluation.retrieval_eval import evaluate_retrieval, write_retrieval_report

    if not cohort.is_dir():
        raise ConfigError(f"--cohort {cohort}: no such folder")
    t0 = time.perf_counter()
    provenance = _check_unseen(bundle, cohort)
    profile_source = _check_profile_source(bundle, profiles, cohort) if profiles is not None else None
    db_path = _database(bundle, cohort, out, args)
    db = CodeDatabase.open(db_path, expected_fingerprint=bundle.fingerprint)
    files = {c.case_id: c for c in find_cases(cohort)}

    def case_files(cid: str) -> CaseFiles:
        return files.get(cid) or CaseFiles.from_database(db, cid)

    progress = _progress(args.no_progress)
    labels = GroundTruthLabels(case_files, bundle, workers=args.workers, progress=progress)
    fdn_pass = FDNPass(bundle)
    h, w = bundle.grid_shape
    methods: list[RankingMethod] = [
        ContinuousFeatures(fdn_pass, "l2"),
        ContinuousFeatures(fdn_pass, "cosine"),
        MaskFractions(
            "model_seg_grid",
            f"Model segmentation at code resolution ({h}x{w} fractions, L2; anatomy: GT)",
            labels,
            (h, w),
            model=fdn_pass,
        ),
        MaskFractions(
            "gt_grid", f"GT masks at code resolution ({h}x{w} fractions, L2) [{GT_NOTE}]", labels, (h, w)
        ),
        MaskFractions(
            "model_seg_grid_dice",
            f"Model segmentation at code resolution ({h}x{w} fractions, soft Dice; anatomy: GT)",
            labels,
            (h, w),
            model=fdn_pass,
            metric="dice",
        ),
        MaskFractions(
            "gt_grid_dice",
            f"GT masks at code resolution ({h}x{w} fractions, soft Dice) [{GT_NOTE}]",
            labels,
            (h, w),
            metric="dice",
        ),
        MaskFractions("gt_full", f"GT masks at full resolution (one-hot, L2) [{GT_NOTE}]", labels, None),
    ]
    size = bundle.config.image_size
    for g in args.seg_grids or ():  # finer than the codes: would ranking by the decoded segmentation help?
        if not 1 <= g <= size:
            raise ConfigError(f"--seg-grids {g}: give grid sizes from 1 to the model's input size {size}")
        exact = "; the exact Dice" if g == size else ""
        methods.append(
            MaskFractions(
                f"model_seg_{g}_dice",
                f"Model segmentation at {g}x{g} (fractions, soft Dice{exact}; anatomy: GT)",
                labels,
                (g, g),
                model=fdn_pass,
                metric="dice",
            )
        )
    if profiles is not None:  # D_D's class-pooled formula on the true fractions: the bound of the D_D rows
        methods.append(
            MaskFractions(
                "gt_grid_pooled_dice",
                f"GT masks at code resolution ({h}x{w} fractions, class-pooled soft Dice as D_D) [{GT_NOTE}]",
                labels,
                (h, w),
                metric="pooled_dice",
            )
        )
    dd_methods = code_dice_methods(profiles, db, tables) if profiles is not None else []
    methods.extend(dd_methods)
    print(f"== leave-one-out evaluation of {cohort} with the diagnostic rankings", flush=True)
    result = evaluate_retrieval(
        bundle,
        db,
        cohort,
        top=args.top,
        progress=progress,
        leave_one_out=True,
        draws=args.draws,
        workers=args.workers,
        methods=methods,
        context=False,  # the diagnosis compares one-slice distances with their ground-truth bounds
    )
    agreement = fdn_pass.code_agreement(db, _context_of(result, db))
    result.notes.append(f"cohort: {cohort} ({provenance})")
    result.notes.append(
        "codes recomputed from the continuous features equal the database's at "
        f"{agreement['normal']:.4f} (normal) / {agreement['abnormal']:.4f} (abnormal) of positions"
    )
    name = cohort.name
    write_retrieval_report(result, out / f"eval_{name}")
    summary = result.summary()
    lbl = {m: result.info(m).label for m in summary}
    reading = diagnosis_lines(summary, lbl)
    s = result.settings
    seconds = time.perf_counter() - t0
    md = [
        f"## {name}: {s['num_reference_volumes']} volumes, {s['num_queries']} tumour queries "
        f"(leave-one-out), top-{result.top}",
        "",
        "Ratio of mean Dice to the oracle's (same queries, references, scores as eval_unseen; random "
        "baselines: ± std over draws). GT rows use ground truth: diagnostics, not methods.",
        "",
        *table_lines(result),
        "",
        "Reading (differences of ratios to the oracle; negative = lost at that step):",
        "",
        *(f"- {line}" for line in reading),
        "",
        f"- {result.notes[-1]}; {provenance}",
        f"- time {seconds:.0f} s (FDN pass {fdn_pass.seconds:.0f} s); full evaluation: "
        f"eval_{name}/retrieval_eval.md",
    ]
    code_dice: dict[str, Any] = {}
    if profiles is not None:
        timing = ", ".join(f"{m.key} {m.seconds:.2f} s" for m in dd_methods)
        md.append(f"- {profiles.summary()}; {profile_source}")
        md.append(
            f"- D_D ranking ({s['num_queries']} queries x {s['num_reference_slices']} slices, both terms and "
            f"the median scales): {timing}"
        )
        if tables is not None:
            md.append(f"- {tables.summary()}")
        code_dice = {
            "profiles": {k: v for k, v in profiles.meta.items() if k != "cases"},
            "source": profile_source,
            "ranking_seconds": {m.key: m.seconds for m in dd_methods},
            **({"tables": {"pairs": tables.stats, "seconds": tables.seconds}} if tables is not None else {}),
        }
    md.append("")
    return {
        "cohort": str(cohort),
        "database": str(db_path),
        "provenance": provenance,
        "code_agreement": agreement,
        "ratios": {m: _ratios(summary, m) for m in summary},
        "labels": lbl,
        "reading": reading,
        "seconds": seconds,
        **({"code_dice": code_dice} if code_dice else {}),
        "markdown": "\n".join(md),
    }


def _context_of(result: RetrievalEvaluation, db: CodeDatabase) -> RankingContext:
    """The references' part of a ranking context (rows and queries), for the code-agreement check."""
    starts = np.asarray(db.case_starts)
    return RankingContext(
        top=result.top,
        query_case_ids=[q.case_id for q in result.queries],
        query_slice=[q.slice_index for q in result.queries],
        query_depth=[0] * len(result.queries),
        query_codes=[],
        own_volume=[],
        k=[],
        case_names=list(db.cases),
        volume_starts=starts,
        volume_depth=np.zeros(len(db.cases), dtype=np.int64),
        row_volume=np.repeat(np.arange(len(db.cases)), np.diff(starts)),
        slice_indices=np.asarray(db.slice_indices),
        scores={},
    )


def run(args: argparse.Namespace) -> int:
    """Diagnose every cohort; returns the exit status."""
    from fdn_core.fileio import atomic_write_bytes, atomic_write_json
    from fdn_core.model.bundle import load_bundle

    _set_threads(args.threads)
    bundle = load_bundle(args.model, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = [
        "# Where retrieval quality is lost: diagnostic rankings beside the FDN (leave-one-out)",
        "",
        f"- model `{args.model}` ({bundle.fingerprint[:16]}), code grid {bundle.grid_shape}, top-{args.top}, "
        f"random baselines over {args.draws} draws, {args.threads} thread(s)",
        "",
    ]
    report: dict[str, Any] = {"model": str(args.model), "fingerprint": bundle.fingerprint, "cohorts": {}}
    profiles, tables = None, None
    if args.train_data is not None:
        print(f"== learning the code profiles on the training cohort {args.train_data}", flush=True)
        profiles = learn_code_profiles(
            bundle,
            Path(args.train_data),
            args.workers,
            _progress(args.no_progress),
            args.profile_cache,
            need_cells=not args.no_dx,
        )
        print(f"   {profiles.summary()}", flush=True)
        md[-1:-1] = [f"- D_D rows: {profiles.summary()}"]
        if not args.no_dx:
            tables = OverlapTables(profiles, positions=not args.no_dx_position)
            print(f"   {tables.summary()}", flush=True)
            md[-1:-1] = [f"- D_X rows: {tables.summary()}"]
    else:
        print("   no --train-data: no code Dice (D_D) rows", flush=True)
    for cohort in dict.fromkeys(Path(c) for c in args.cohort):
        entry = diagnose_cohort(bundle, cohort, out, args, profiles, tables)
        print("\n" + entry["markdown"], flush=True)
        md.append(entry.pop("markdown"))
        report["cohorts"][cohort.name] = entry
        atomic_write_json(out / "diagnose_retrieval.json", report)
        atomic_write_bytes(out / "diagnose_retrieval.md", "\n".join(md).encode("utf-8"))
    print(f"Wrote {out / 'diagnose_retrieval.md'} and {out / 'diagnose_retrieval.json'}", flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    from fdn_core.cli.args import add_device, add_model, positive_int

    parser = argparse.ArgumentParser(
        prog="diagnose_retrieval.py",
        description="Leave-one-out retrieval with diagnostic rankings (GT / model masks at code resolution, "
        "continuous features) beside the FDN, the trivial baselines and the oracle.",
    )
    add_model(parser)
    parser.add_argument("--cohort", type=Path, nargs="+", required=True, help="cohort folder(s)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the reports (and databases)")
    parser.add_argument("--db", type=Path, default=None, help="code database of the (single) cohort")
    parser.add_argument("--top", type=positive_int, default=10, help="k of the volume-wise top-k")
    parser.add_argument("--draws", type=positive_int, default=10, help="draws of the random baselines")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch and numba threads")
    parser.add_argument("--workers", type=positive_int, default=1, help="volume loading threads")
    parser.add_argument(
        "--train-data",
        type=Path,
        default=None,
        help="the model's training cohort: learn per-code class profiles on it and add the code Dice (D_D) "
        "rows (without it: no D_D rows)",
    )
    parser.add_argument(
        "--profile-cache",
        type=Path,
        default=None,
        help="a .npz file keeping the learned code profiles (reused for the same model and training cases)",
    )
    parser.add_argument(
        "--no-dx",
        action="store_true",
        help="no expected-overlap code Dice (D_X) rows (they need the training cells: a cache without them "
        "is relearned)",
    )
    parser.add_argument(
        "--no-dx-position", action="store_true", help="no per-position D_X row (only the shared tables)"
    )
    parser.add_argument(
        "--seg-grids",
        type=positive_int,
        nargs="+",
        default=None,
        help="also rank by the model's decoded segmentation (a function of the abnormal codes) pooled to "
        "these grid sizes, by soft Dice (the model's input size: its exact Dice)",
    )
    add_device(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; errors print ``diagnose_retrieval: error: ...`` and return 2."""
    from fdn_core.errors import ConfigError, FDNError

    args = _parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        if args.db is not None and len(args.cohort) > 1:
            raise ConfigError("--db names the database of one cohort: give a single --cohort with it")
        return run(args)
    except FDNError as exc:
        print(f"diagnose_retrieval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
