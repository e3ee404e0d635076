"""The paper's retrieval evaluation (section 4.4.6, Table 2), its oracle, and mAP@k.

Protocol (what ``evaluate_retrieval`` does)
-------------------------------------------
- Query volumes: the cases named by the caller, or every case of the data folder that is not in the
  database (a held-out split), or with ``leave_one_out`` every volume of the database (each against all the
  others) - in all cases only volumes with a tumour. The query slice of a volume is the
  axial slice with the largest tumour area (abnormal label > 0) at the model's resolution; ties go to the
  lowest slice.
- References: every slice in the database except those of the query's own volume (never retrieved).
- Retrieval: volume-wise top-Q (paper: Q = 10): each reference volume is represented by its single closest
  slice, volumes are ranked by that distance and the first Q are returned.
- Searches: distances ``euclidean`` (D_E), ``angular`` (D_A), ``hamming`` (D_H) crossed with similarities
  S_normal (normal codes), S_abnormal (abnormal codes), S_sum (both distances summed; paper eq. 17) and our
  S_sum normalised (each code type's distance divided by its scale, see ``fdn_core.codes.search``).
- Scores: the label overlap between the query slice and each retrieved slice, averaged over the Q retrieved
  slices, then reported as mean +- std over the queries:
  * S_normal is scored with ``anatomy Dice`` (labels 1..6), S_abnormal with ``tumour Dice`` (classes 1..3),
    S_sum with their average ``(anatomy Dice + tumour Dice) / 2`` (the paper averages both).
  * Multi-class Dice of two label slices (``multiclass_dice``): for each class c that occurs in at least
    one of the two slices, ``Dice_c = 2 |A_c & B_c| / (|A_c| + |B_c|)``; the score is the mean of ``Dice_c``
    over those classes. Classes absent from both slices are skipped (they carry no information); when no class
    occurs in either slice (two empty label maps) the score is 1.0 (the maps agree exactly).
- Oracle ("brutal search"): the same volume-wise top-Q, but ranking reference slices by the very score being
  reported, computed from ground truth: anatomy Dice for S_normal, tumour Dice for S_abnormal, and their sum
  (equivalently their average) for both S_sum columns. It is the technical upper bound; we also report each
  method's ratio to it.
- Trivial baselines, on the same queries and references and scored the same way (one ranking scored for
  every similarity): ``random`` (k random reference volumes, a random slice of each), ``level prior`` (k
  random reference volumes, the slice at the query's axial level) - both averaged over seeded draws, with the
  spread of the draws reported - and ``pooled pixels`` (L2 between the model-input slices average-pooled to
  the code grid; each volume's closest slice). For every similarity the report states the margin of the best
  FDN distance over the best trivial baseline: the difference of their ratios to the oracle and the ratio of
  those ratios. Every method is a ``fdn_core.evaluation.ranking.RankingMethod``; other embedding methods
  plug in through ``evaluate_retrieval(..., methods=...)``.
- mAP@k (k = Q): relevance of a retrieved slice is "has abnormal" (any tumour label at the model's resolution)
  equal to the query's (all protocol queries have a tumour, so relevant = the retrieved slice shows tumour).
  ``AP@k = sum_{i<=k} P@i * rel_i / min(k, R)`` where ``P@i`` is the precision of the first i results and R is
  the number of relevant candidates (volume-wise: reference volumes with at least one relevant slice;
  slice-wise: relevant reference slices); queries with R = 0 are left out (AP undefined). mAP@k is the mean of
  AP@k over queries. ``P@k`` (precision of the k results) is reported beside it.
- The same ranking metrics under the relevance definitions of the baselines' papers, where they transfer
  (``RELEVANCES``): ``lesion`` (as above), ``lesion_classes`` (the same set of abnormal classes as the query
  slice: seed 004's "same class"), ``level`` (relative axial level within ``level_tolerance``, default 0.05:
  the same anatomical level) and ``classes_and_level`` (both); each with mAP@k, P@k and ``mP@1..k`` = the mean
  of P@1..P@k (``mean_precision_1_to_k``; seed 003's eq. 5 calls it "MAP", its code averaged P@1..4 for
  "MAP@5": we name it for what it is). Summary keys ``mAP@k[rel]``, ``P@k[rel]``, ``mP@1..k[rel]``.

Labels are the cohort's at the model resolution (``volume_to_slices`` with the bundle's preprocess config), so
the Dice compares exactly the slices the codes were computed from.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fdn_core.errors import ConfigError, DataError, ModelMismatchError
from fdn_core.evaluation.metrics import dice_matrix
from fdn_core.evaluation.ranking import (
    BASELINES,
    SIMILARITIES,
    FDNDistance,
    Oracle,
    RankingContext,
    RankingMethod,
    Similarity,
    context_key,
    make_baselines,
    volume_wise_best,
)
from fdn_core.fileio import atomic_write_bytes, atomic_write_json
from fdn_core.labels import (
    ABNORMAL_CLASSES,
    ANATOMY_CLASSES,
    AXIAL_CONTEXT,
    DISTANCES,
    available_distances,
)

if TYPE_CHECKING:
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.data.preprocess import PreprocessConfig, SliceStack
    from fdn_core.data.readers import CaseFiles
    from fdn_core.model.bundle import InferenceBundle
    from fdn_core.progress import Progress

__all__ = [
    "BASELINES",
    "COLUMNS",
    "DEFINITIONS",
    "ORACLE",
    "RELEVANCES",
    "MethodInfo",
    "QueryInfo",
    "RetrievalEvaluation",
    "average_precision_at_k",
    "class_set_codes",
    "evaluate_retrieval",
    "largest_tumour_slice",
    "margin_lines",
    "markdown_report",
    "mean_precision_1_to_k",
    "method_table_rows",
    "oracle_volume_wise",
    "ordered_methods",
    "precision_at_k",
    "relevance_markdown",
    "relevance_matrices",
    "relevance_table_rows",
    "volume_wise_best",
    "write_retrieval_report",
]


def largest_tumour_slice(seg_slices: np.ndarray) -> tuple[int, int]:
    """(slice index, tumour pixel count) of the slice with the largest tumour area; ties -> lowest index."""
    seg = np.asarray(seg_slices)
    if seg.ndim != 3 or seg.shape[0] == 0:
        raise DataError(f"largest_tumour_slice: expected (Z,H,W) label slices, got shape {seg.shape}")
    areas = (seg > 0).reshape(seg.shape[0], -1).sum(axis=1)
    k = int(np.argmax(areas))
    return k, int(areas[k])


def oracle_volume_wise(
    dice: np.ndarray, row_volume: np.ndarray, k: int, exclude_volume: int | None = None
) -> np.ndarray:
    """The "brutal search": rows of the volume-wise top-``k`` by ground-truth overlap ``dice`` (higher is
    better)."""
    return volume_wise_best(dice, row_volume, k, higher_is_better=True, exclude_volume=exclude_volume)


def precision_at_k(relevant_ranked: Sequence[bool], k: int) -> float:
    """Share of relevant items among the first ``k`` results (fewer returned results still divide by k)."""
    if k < 1:
        raise DataError(f"precision_at_k: k must be at least 1, got {k}")
    rel = np.asarray(relevant_ranked, dtype=bool)[:k]
    return float(rel.sum()) / k


def average_precision_at_k(relevant_ranked: Sequence[bool], k: int, n_relevant: int) -> float:
    """AP@k = sum_{i<=k} P@i * rel_i / min(k, n_relevant); NaN when ``n_relevant`` is 0 (undefined)."""
    if k < 1:
        raise DataError(f"average_precision_at_k: k must be at least 1, got {k}")
    rel = np.asarray(relevant_ranked, dtype=bool)[:k]
    if n_relevant < int(rel.sum()):
        raise DataError(
            f"average_precision_at_k: {int(rel.sum())} relevant results but only {n_relevant} relevant "
            "candidates"
        )
    if n_relevant == 0:
        return math.nan
    hits = np.cumsum(rel)
    precisions = hits / np.arange(1, rel.size + 1)
    return float((precisions * rel).sum() / min(k, n_relevant))


def mean_precision_1_to_k(relevant_ranked: Sequence[bool], k: int) -> float:
    """mP@1..k = (1/k) sum_{i=1..k} P@i: the mean of the precisions at 1..k. This is what seed 003 (eq. 5)
    calls "MAP" (its code averaged P@1..4 for "MAP@5"); it is not the average precision: a relevant result at
    rank 1 raises every P@i, so it weighs early hits more than AP@k does."""
    if k < 1:
        raise DataError(f"mean_precision_1_to_k: k must be at least 1, got {k}")
    rel = np.zeros(k, dtype=bool)
    given = np.asarray(relevant_ranked, dtype=bool)[:k]
    rel[: given.size] = given
    return float((np.cumsum(rel) / np.arange(1, k + 1)).mean())


#: Relevance definitions of the ranking metrics (mAP@k, P@k, mP@1..k), by key.
RELEVANCES: dict[str, str] = {
    "lesion": "the retrieved slice has tumour labels (every protocol query has one)",
    "lesion_classes": "the retrieved slice has exactly the query slice's set of abnormal classes "
    "(NCR/NET, ED, "
    "ET): seed 004's slice-level class transferred (same pathological pattern)",
    "level": "the retrieved slice's relative axial level (slice index / (slices - 1)) is within the level "
    "tolerance of the query's: the same anatomical level (seed 003's organ-present relevance transferred)",
    "classes_and_level": "both: the same abnormal-class set at the same level (what S_sum asks; Y-Net's "
    "training positives)",
}


def relevance_matrices(
    query_class_set: np.ndarray,
    query_level: np.ndarray,
    ref_class_set: np.ndarray,
    ref_level: np.ndarray,
    level_tolerance: float,
) -> dict[str, np.ndarray]:
    """(Nq, N) boolean relevance of every reference row to every query, per ``RELEVANCES`` key.

    Class sets are int codes (bit c-1 set when abnormal class c is present; 0 = no lesion); levels are
    relative
    axial positions in [0, 1]."""
    qc, rc = np.asarray(query_class_set)[:, None], np.asarray(ref_class_set)[None, :]
    lesion = np.broadcast_to(rc > 0, (qc.shape[0], rc.shape[1]))
    classes = qc == rc
    level = (
        np.abs(np.asarray(query_level)[:, None] - np.asarray(ref_level)[None, :]) <= level_tolerance + 1e-12
    )
    return {
        "lesion": np.array(lesion),
        "lesion_classes": classes,
        "level": level,
        "classes_and_level": classes & level,
    }


def class_set_codes(seg: np.ndarray) -> np.ndarray:
    """(N,) int lesion-class-set codes of label slices (N, H, W) (classes 0..3): sum of 2**(c-1) over the
    abnormal classes present."""
    flat = np.asarray(seg).reshape(np.asarray(seg).shape[0], -1)
    out = np.zeros(flat.shape[0], dtype=np.int64)
    for c in ABNORMAL_CLASSES:
        out |= (flat == c).any(axis=1).astype(np.int64) << (c - 1)
    return out


# -------------------------------------------------------------------------------------------- protocol

#: Table columns: (key, engine search mode, score). Scores: "anatomy" Dice, "tumour" Dice, "mean" =
#: (anatomy + tumour) / 2; the oracle maximises the same quantity (for "mean" equivalently the sum).
COLUMNS: tuple[tuple[str, str, str], ...] = tuple((s.key, s.mode, s.score) for s in SIMILARITIES)
ORACLE = "oracle"


@dataclass(frozen=True)
class MethodInfo:
    """What a result row is: key, display label, kind ("fdn", "baseline", "oracle", "embedding"), number of
    seeded draws averaged, and a one-line description."""

    key: str
    label: str
    kind: str
    draws: int
    description: str

    @classmethod
    def of(cls, method: RankingMethod) -> MethodInfo:
        """The info of a ranking method."""
        return cls(method.key, method.label or method.key, method.kind, method.draws, method.description)


@dataclass
class QueryInfo:
    """One protocol query: the case, its largest-tumour slice, that slice's tumour area (pixels at the model's
    resolution) and whether the case is also in the database (then its own volume is excluded)."""

    case_id: str
    slice_index: int
    tumour_pixels: int
    in_database: bool


@dataclass
class RetrievalEvaluation:
    """Per-query results of ``evaluate_retrieval``; ``summary()`` gives the Table-2-like aggregate.

    ``scores[method][column]``, ``ap[method][column]`` and ``precision[method][column]`` are (Nq,) arrays
    (NaN where undefined; for methods with several draws, the mean over draws), ``retrieved[method][column]``
    lists each query's (case, slice) results in rank order (the first draw); methods are the FDN distances,
    the baselines, any other methods and ``"oracle"`` (``methods`` describes each), columns the keys of
    ``COLUMNS`` that could be scored. ``draw_scores[method][column]`` (draws, Nq) and ``draw_retrieved`` keep
    every draw of multi-draw methods. ``cases`` holds the files of every query and reference case.
    ``relevance[method][relevance][column]`` maps "AP", "P" and "mP" to (Nq,) arrays of AP@k, P@k and
    mP@1..k under each relevance definition of ``RELEVANCES`` (mean over draws).
    """

    queries: list[QueryInfo]
    top: int
    k_effective: list[int]
    scores: dict[str, dict[str, np.ndarray]]
    ap: dict[str, dict[str, np.ndarray]]
    precision: dict[str, dict[str, np.ndarray]]
    retrieved: dict[str, dict[str, list[list[tuple[str, int]]]]]
    search_seconds: dict[str, float]
    settings: dict[str, Any]
    notes: list[str]
    methods: dict[str, MethodInfo] = field(default_factory=dict)
    draw_scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    draw_retrieved: dict[str, dict[str, list[list[list[tuple[str, int]]]]]] = field(default_factory=dict)
    cases: dict[str, CaseFiles] = field(default_factory=dict)
    relevance: dict[str, dict[str, dict[str, dict[str, np.ndarray]]]] = field(default_factory=dict)

    def info(self, method: str) -> MethodInfo:
        """The ``MethodInfo`` of a result key (FDN distances and the oracle when not recorded)."""
        if method in self.methods:
            return self.methods[method]
        if method == ORACLE:
            return MethodInfo.of(Oracle())
        label = FDNDistance._LABELS.get(method, method)
        return MethodInfo(method, label, "fdn" if method in DISTANCES else "embedding", 1, "")

    def summary(self) -> dict[str, Any]:
        """Mean +- std (ddof=0) over queries of each score, its ratio to the oracle, mAP@k and P@k; for
        multi-draw methods also the spread (std, min, max) of the draw means and of their ratios."""
        out: dict[str, Any] = {}
        for method, cols in self.scores.items():
            out[method] = {}
            for col, values in cols.items():
                mean, std = _mean_std(values)
                oracle_mean = _mean_std(self.scores[ORACLE][col])[0] if ORACLE in self.scores else math.nan
                has_oracle = bool(oracle_mean) and not math.isnan(oracle_mean)
                ap = self.ap[method][col]
                cell: dict[str, Any] = {
                    "mean_dice": mean,
                    "std_dice": std,
                    "ratio_to_oracle": mean / oracle_mean if has_oracle else None,
                    f"mAP@{self.top}": _mean_std(ap)[0],
                    f"mAP@{self.top}_queries": int(np.count_nonzero(~np.isnan(ap))),
                    f"P@{self.top}": _mean_std(self.precision[method][col])[0],
                }
                for rel, cols_rel in self.relevance.get(method, {}).items():
                    metrics = cols_rel.get(col)
                    if metrics is None:
                        continue
                    cell[f"mAP@{self.top}[{rel}]"] = _mean_std(metrics["AP"])[0]
                    cell[f"P@{self.top}[{rel}]"] = _mean_std(metrics["P"])[0]
                    cell[f"mP@1..{self.top}[{rel}]"] = _mean_std(metrics["mP"])[0]
                draws = self.draw_scores.get(method, {}).get(col)
                if draws is not None and draws.shape[0] > 1:
                    per_draw = np.asarray([_mean_std(d)[0] for d in draws])
                    cell.update(
                        draws=int(draws.shape[0]),
                        draw_std_dice=float(per_draw.std()),
                        draw_min_dice=float(per_draw.min()),
                        draw_max_dice=float(per_draw.max()),
                    )
                    if has_oracle:
                        cell.update(
                            ratio_draw_std=float(per_draw.std() / oracle_mean),
                            ratio_draw_min=float(per_draw.min() / oracle_mean),
                            ratio_draw_max=float(per_draw.max() / oracle_mean),
                        )
                out[method][col] = cell
        return _nan_to_none(out)

    def margins(self) -> dict[str, Any]:
        """Per similarity: the best FDN distance against the best trivial baseline (by ratio to the oracle):
        both ratios, their difference and quotient, whether the FDN beats the baseline, and on how many
        queries the FDN's Dice is higher / lower / equal. Similarities lacking either side are left out."""
        summary = self.summary()
        fdn = [m for m in summary if self.info(m).kind == "fdn"]
        base = [m for m in summary if self.info(m).kind == "baseline"]
        out: dict[str, Any] = {}
        for col in summary.get(ORACLE, {}):

            def best(group: list[str], col: str = col) -> tuple[str, float] | None:
                ratios = [(summary[m][col]["ratio_to_oracle"], m) for m in group]
                ratios = [(r, m) for r, m in ratios if r is not None]
                return None if not ratios else max(ratios, key=lambda t: (t[0], -group.index(t[1])))[::-1]

            f, b = best(fdn), best(base)
            if f is None or b is None:
                continue
            diff = self.scores[f[0]][col] - self.scores[b[0]][col]
            ok = ~np.isnan(diff)
            out[col] = {
                "best_fdn": f[0],
                "best_fdn_ratio": f[1],
                "best_baseline": b[0],
                "best_baseline_ratio": b[1],
                "difference": f[1] - b[1],
                "ratio_of_ratios": f[1] / b[1] if b[1] else None,
                "fdn_beats_baseline": bool(f[1] > b[1]),
                "queries_fdn_higher": int(np.count_nonzero(diff[ok] > 0)),
                "queries_fdn_lower": int(np.count_nonzero(diff[ok] < 0)),
                "queries_equal": int(np.count_nonzero(diff[ok] == 0)),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON: settings, notes, methods, summary, margins and per-query results."""
        per_query = []
        for i, q in enumerate(self.queries):
            entry: dict[str, Any] = {
                "case_id": q.case_id,
                "slice_index": q.slice_index,
                "tumour_pixels": q.tumour_pixels,
                "in_database": q.in_database,
                "k_effective": self.k_effective[i],
                "results": {},
            }
            for method, cols in self.scores.items():
                entry["results"][method] = {}
                for col in cols:
                    res: dict[str, Any] = {
                        "dice": float(cols[col][i]),
                        f"AP@{self.top}": float(self.ap[method][col][i]),
                        f"P@{self.top}": float(self.precision[method][col][i]),
                        "retrieved": [[c, int(s)] for c, s in self.retrieved[method][col][i]],
                    }
                    rel_metrics = {
                        rel: {m: float(v[i]) for m, v in cols_rel[col].items()}
                        for rel, cols_rel in self.relevance.get(method, {}).items()
                        if col in cols_rel
                    }
                    if rel_metrics:
                        res["relevance"] = rel_metrics
                    draws = self.draw_retrieved.get(method, {}).get(col)
                    if draws is not None and len(draws) > 1:
                        res["draws"] = [
                            {
                                "dice": float(self.draw_scores[method][col][d, i]),
                                "retrieved": [[c, int(s)] for c, s in draws[d][i]],
                            }
                            for d in range(len(draws))
                        ]
                    entry["results"][method][col] = res
            per_query.append(entry)
        return _nan_to_none(
            {
                "settings": self.settings,
                "definitions": DEFINITIONS,
                "notes": self.notes,
                "methods": {m: dataclasses.asdict(self.info(m)) for m in self.scores},
                "summary": self.summary(),
                "margins": self.margins(),
                "search_seconds": self.search_seconds,
                "queries": per_query,
            }
        )


DEFINITIONS: dict[str, str] = {
    "query": "per query volume, the axial slice with the largest tumour area (labels > 0), model resolution",
    "references": "every database slice except those of the query's own volume",
    "retrieval": "volume-wise top-k: each reference volume's closest slice, volumes ranked by that distance",
    "dice": "multi-class Dice of two label slices: mean over the classes present in either slice of "
    "2|A_c & B_c| / (|A_c| + |B_c|); 1.0 when neither slice holds any class",
    "S_normal": "search with normal codes, scored by anatomy Dice (labels 1-6), mean over the k results",
    "S_abnormal": "search with abnormal codes, scored by tumour Dice (classes 1-3), mean over the k results",
    "S_sum": "search with D_normal + D_abnormal, scored by (anatomy Dice + tumour Dice) / 2",
    "S_sum_normalized": "search with D_normal / s_normal + D_abnormal / s_abnormal (s: median distance over "
    "random database pairs), scored like S_sum",
    "oracle": "brutal search: volume-wise top-k ranked by the reported score itself, from ground truth",
    "random": "trivial baseline: k distinct random reference volumes, a random slice of each (seeded draws, "
    "averaged; one ranking scored for every similarity)",
    "level_prior": "trivial baseline: k distinct random reference volumes, in each the slice at the query's "
    "axial index, scaled by relative position when slice counts differ (seeded draws, averaged)",
    "pooled_pixels": "trivial baseline: L2 between the z-scored model-input slices (4 channels) "
    "average-pooled to the code grid; each volume's closest slice",
    "margin": "best FDN distance's ratio to the oracle minus the best trivial baseline's (and their "
    "quotient)",
    "draw spread": "for seeded random baselines, std (and min-max) over draws of the mean over queries",
    "mAP@k": "mean over queries of AP@k = sum_{i<=k} P@i rel_i / min(k, R); rel_i: result i has tumour "
    "labels (as the query does); R: reference volumes with at least one tumour slice; queries with R = 0 "
    "left out",
    "P@k": "share of the k results with tumour labels (k = min(top, number of reference volumes))",
    "mP@1..k": "mean of P@1 .. P@k: what seed 003 (eq. 5) calls MAP; not an average precision",
    "relevance": "mAP@k[r], P@k[r], mP@1..k[r] use relevance r: "
    + "; ".join(f"{k}: {v}" for k, v in RELEVANCES.items()),
    "mean +- std": "over queries, population standard deviation (ddof = 0)",
}


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std())


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


@dataclass
class _QuerySlice:
    info: QueryInfo
    depth: int
    normal: np.ndarray
    abnormal: np.ndarray
    seg: np.ndarray
    anat: np.ndarray | None
    normal_context: np.ndarray | None = None


def _load_stacks(
    files: Sequence[CaseFiles], preprocess: PreprocessConfig, workers: int
) -> Iterator[tuple[CaseFiles, SliceStack]]:
    """``(files, slices)`` in order, ``workers`` threads loading and preprocessing ahead."""
    from fdn_core.data.preprocess import volume_to_slices
    from fdn_core.data.readers import load_case, parallel_map

    def prepare(f: CaseFiles) -> tuple[CaseFiles, SliceStack]:
        return f, volume_to_slices(load_case(f), preprocess)

    yield from parallel_map(prepare, files, workers)


def _skipped_note(reason: str, cases: list[str]) -> str:
    shown = ", ".join(cases[:20]) + (f" ... ({len(cases)} in all)" if len(cases) > 20 else "")
    return f"{len(cases)} query case(s) {reason}: skipped ({shown})"


def evaluate_retrieval(
    bundle: InferenceBundle,
    db: CodeDatabase | str | Path,
    data_dir: str | Path | None = None,
    queries: Sequence[str] | None = None,
    top: int = 10,
    distances: Sequence[str] | None = None,
    progress: Progress | None = None,
    batch_size: int | None = None,
    *,
    leave_one_out: bool = False,
    baselines: Sequence[str] = BASELINES,
    draws: int = 10,
    seed: int = 0,
    methods: Sequence[RankingMethod] = (),
    workers: int = 2,
    level_tolerance: float = 0.05,
    context: bool = True,
) -> RetrievalEvaluation:
    """Run the paper's retrieval evaluation (module docstring) of ``bundle``'s database ``db``.

    ``queries``: the query case ids (default: every case of ``data_dir`` that is not in the database);
    ``leave_one_out``: every database volume with a tumour is a query against all the other volumes (then
    ``data_dir`` is optional). Cases are looked up in ``data_dir`` first and otherwise at the source paths the
    database recorded. ``baselines`` (``BASELINES``) are evaluated beside the FDN ``distances`` on the same
    queries and references, the random ones over ``draws`` draws seeded by ``seed``; ``distances`` default to
    the paper's three and the learned one when the bundle has a retrieval embedding; ``methods`` adds other
    ranking methods (``fdn_core.evaluation.ranking``). ``workers`` threads load volumes ahead.
    ``level_tolerance``: the "level" relevance's largest relative axial distance (``RELEVANCES``).
    ``context``: each distance is also evaluated with the normal term over the query's axial context
    (``labels.AXIAL_CONTEXT``; rows keyed ``ranking.context_key(distance)``).
    """
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.data.readers import CaseFiles, find_cases
    from fdn_core.retrieval import Retriever, encode_context, load_hamming_codes

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise DataError(f"top must be a positive integer, got {top!r}")
    if distances is None:
        distances = available_distances(bundle.retrieval_embedding is not None)
    unknown = [d for d in distances if d not in DISTANCES]
    if unknown or not distances:
        raise DataError(f"distances {list(distances)}: choose among {list(DISTANCES)}")
    if "learned" in distances and bundle.retrieval_embedding is None:
        raise DataError(
            f"{bundle.path}: the learned distance needs the bundle's retrieval embedding, which it does not "
            "have; add one with `fdn train-embedding` or leave the learned distance out"
        )
    if leave_one_out and queries is not None:
        raise ConfigError("leave-one-out uses every database volume as a query: do not also give queries")
    if not isinstance(db, CodeDatabase):
        db = CodeDatabase.open(db, expected_fingerprint=bundle.fingerprint)
    elif db.fingerprint != bundle.fingerprint:
        raise ModelMismatchError(
            f"{db.path} was built with model {db.fingerprint[:16]}..., not with the bundle in use "
            f"({bundle.fingerprint[:16]}...); evaluate with the model the database was built with"
        )
    if len(db) == 0:
        raise DataError(f"{db.path} is empty; add reference cases with `fdn index add`")
    extra = [*make_baselines(baselines, db.grid_shape, draws=draws, seed=seed), *methods]
    keys = [*distances, *(context_key(d) for d in distances if context), *(m.key for m in extra), ORACLE]
    clash = sorted({k for k in keys if keys.count(k) > 1})
    if clash or any(not k for k in keys):
        raise ConfigError(f"ranking methods need distinct, non-empty keys; repeated: {clash}")
    if data_dir is None and not leave_one_out:
        raise DataError("give the cohort folder (data_dir) that holds the query cases")
    data_dir = None if data_dir is None else Path(data_dir)
    cohort = {} if data_dir is None else {c.case_id: c for c in find_cases(data_dir)}
    notes: list[str] = []

    def case_files(cid: str) -> CaseFiles:
        return cohort.get(cid) or CaseFiles.from_database(db, cid)

    # ---- queries
    explicit = queries is not None
    if queries is not None:
        missing = [q for q in queries if q not in cohort]
        if missing:
            raise DataError(
                f"{data_dir}: query case(s) {missing} not found; check the ids (fdn inspect lists them)"
            )
        query_ids = list(dict.fromkeys(queries))
        selection = "given"
    elif leave_one_out:
        query_ids = list(db.cases)
        selection = "leave-one-out: every database volume with a tumour, against all the others"
    else:
        query_ids = [c for c in cohort if c not in db]
        selection = "cases of the data folder not in the database"
        if not query_ids:
            raise DataError(
                f"every case of {data_dir} is in {db.path}, so there is no held-out query case; pass the "
                "query cases explicitly (--queries), index only part of the cohort, or evaluate "
                "leave-one-out (--leave-one-out)"
            )
    retriever = Retriever(db, bundle, load_hamming_codes(db))
    if "hamming" in distances:
        retriever.ensure_hamming(progress)
    all_methods: list[RankingMethod] = [
        *(FDNDistance(retriever, d) for d in distances),
        *(FDNDistance(retriever, d, context=True) for d in (distances if context else ())),
        *extra,
        Oracle(),
    ]
    used_cases: dict[str, CaseFiles] = {}
    qslices: list[_QuerySlice] = []
    no_seg: list[str] = []
    no_tumour: list[str] = []
    query_files = [case_files(cid) for cid in query_ids]
    if progress is not None:
        progress.update(0, len(query_ids), "Loading query cases")
    for i, (files, stack) in enumerate(_load_stacks(query_files, bundle.preprocess, workers), 1):
        cid = files.case_id
        if stack.seg is None:
            if explicit:
                raise DataError(
                    f"query case {cid} has no tumour labels (seg), so its largest-tumour slice is unknown; "
                    "give labelled query cases"
                )
            no_seg.append(cid)
        else:
            k, area = largest_tumour_slice(stack.seg)
            if area == 0:
                no_tumour.append(cid)
            else:
                if cid in db:
                    qs = retriever.slice_from_database(cid, k)
                    normal, abnormal, around = qs.normal, qs.abnormal, qs.normal_context
                else:
                    enc = bundle.encode_slices(stack.images[k : k + 1], batch_size=batch_size)
                    normal, abnormal, around = enc.normal[0], enc.abnormal[0], None
                    if context:
                        around = encode_context(bundle, stack.images, k, normal, batch_size)
                anat = None if stack.anat is None else stack.anat[k]
                for m in all_methods:
                    m.observe_query(len(qslices), stack.images, k)
                depth = int(stack.images.shape[0])
                info = QueryInfo(cid, k, area, cid in db)
                qslices.append(_QuerySlice(info, depth, normal, abnormal, stack.seg[k], anat, around))
                used_cases[cid] = files
        if progress is not None:
            progress.update(i, len(query_ids), "Loading query cases")
    if no_seg:
        notes.append(
            _skipped_note("have no tumour labels (seg), so their largest-tumour slice is unknown", no_seg)
        )
    if no_tumour:
        notes.append(_skipped_note("have no tumour at the model's resolution", no_tumour))
    if not qslices:
        raise DataError(
            f"no tumour in any query case {query_ids[:20]}; the protocol queries with each volume's "
            "largest-tumour slice: give query cases with tumour labels"
        )
    nq = len(qslices)

    # ---- references: ground-truth overlap of every query with every database slice
    n = len(db)
    starts = np.asarray(db.case_starts)
    case_names = list(db.cases)
    row_volume = np.repeat(np.arange(len(case_names)), np.diff(starts))
    tumour = np.zeros((nq, n), dtype=np.float64)
    anatomy: np.ndarray | None = np.zeros((nq, n), dtype=np.float64)
    no_anat: list[str] = [q.info.case_id for q in qslices if q.anat is None]
    ref_tumour = np.zeros(n, dtype=bool)
    ref_class = np.zeros(n, dtype=np.int64)
    ref_level = np.zeros(n, dtype=np.float64)
    volume_depth = np.zeros(len(case_names), dtype=np.int64)
    q_seg = np.stack([q.seg for q in qslices])
    q_anat = None if no_anat else np.stack([q.anat for q in qslices if q.anat is not None])
    slice_indices = np.asarray(db.slice_indices)
    ref_files = [case_files(cid) for cid in case_names]
    if progress is not None:
        progress.update(0, len(case_names), "Scoring reference slices")
    for ci, (files, stack) in enumerate(_load_stacks(ref_files, bundle.preprocess, workers)):
        cid = files.case_id
        if stack.seg is None:
            raise DataError(
                f"reference case {cid} ({files.seg or 'no seg file'}) has no tumour labels; the retrieval "
                "evaluation needs labels for every database case"
            )
        lo, hi = int(starts[ci]), int(starts[ci + 1])
        ks = slice_indices[lo:hi]
        if ks.size and int(ks.max()) >= stack.seg.shape[0]:
            raise DataError(
                f"reference case {cid}: the database holds slice {int(ks.max())} but the volume has "
                f"{stack.seg.shape[0]} slices; the files changed since indexing: re-index the case"
            )
        volume_depth[ci] = stack.seg.shape[0]
        seg = stack.seg[ks]
        tumour[:, lo:hi] = dice_matrix(q_seg, seg, ABNORMAL_CLASSES)
        ref_tumour[lo:hi] = (seg.reshape(seg.shape[0], -1) > 0).any(axis=1)
        ref_class[lo:hi] = class_set_codes(seg)
        ref_level[lo:hi] = ks / max(stack.seg.shape[0] - 1, 1)
        if stack.anat is None:
            no_anat.append(cid)
        if anatomy is not None and q_anat is not None and stack.anat is not None and not no_anat:
            anatomy[:, lo:hi] = dice_matrix(q_anat, stack.anat[ks], ANATOMY_CLASSES)
        for m in all_methods:
            m.observe_reference(ci, slice(lo, hi), stack.images[ks])
        used_cases.setdefault(cid, files)
        if progress is not None:
            progress.update(ci + 1, len(case_names), "Scoring reference slices")
    similarities = list(SIMILARITIES)
    if no_anat:
        anatomy = None
        similarities = [s for s in SIMILARITIES if s.score == "tumour"]
        notes.append(
            f"no anatomy labels for {len(no_anat)} case(s) (e.g. {', '.join(no_anat[:5])}): S_normal and "
            "S_sum cannot be scored; only S_abnormal is reported"
        )
    tables = {"tumour": tumour}
    if anatomy is not None:
        tables.update(anatomy=anatomy, mean=(anatomy + tumour) / 2.0)

    # ---- per query: own volume, relevant volumes, effective k
    vol_index = {c: i for i, c in enumerate(case_names)}
    own = [vol_index.get(q.info.case_id) for q in qslices]
    vol_has_tumour = np.zeros(len(case_names), dtype=bool)
    np.logical_or.at(vol_has_tumour, row_volume, ref_tumour)
    n_relevant = [int(vol_has_tumour.sum()) - (1 if o is not None and vol_has_tumour[o] else 0) for o in own]
    q_class = class_set_codes(q_seg)
    q_level = np.asarray([q.info.slice_index / max(q.depth - 1, 1) for q in qslices])
    rel_tables = relevance_matrices(q_class, q_level, ref_class, ref_level, level_tolerance)
    rel_counts = {name: _relevant_volumes(table, starts, own) for name, table in rel_tables.items()}
    k_eff = [min(top, len(case_names) - (1 if o is not None else 0)) for o in own]
    if min(k_eff) < 1:
        raise DataError(f"{db.path} holds no volume other than the query's own; add reference cases")
    if max(k_eff) < top:
        notes.append(
            f"the database has fewer than {top} reference volumes per query: k = {max(k_eff)} results"
        )
    ctx = RankingContext(
        top=top,
        query_case_ids=[q.info.case_id for q in qslices],
        query_slice=[q.info.slice_index for q in qslices],
        query_depth=[q.depth for q in qslices],
        query_codes=[(q.normal, q.abnormal) for q in qslices],
        own_volume=own,
        k=k_eff,
        case_names=case_names,
        volume_starts=starts,
        volume_depth=volume_depth,
        row_volume=row_volume,
        slice_indices=slice_indices,
        scores=tables,
        query_context=[q.normal_context for q in qslices],
    )

    # ---- every method ranks, every ranking is scored the same way
    scores: dict[str, dict[str, np.ndarray]] = {}
    ap: dict[str, dict[str, np.ndarray]] = {}
    prec: dict[str, dict[str, np.ndarray]] = {}
    retrieved: dict[str, dict[str, list[list[tuple[str, int]]]]] = {}
    draw_scores: dict[str, dict[str, np.ndarray]] = {}
    draw_retrieved: dict[str, dict[str, list[list[list[tuple[str, int]]]]]] = {}
    seconds: dict[str, float] = {}
    relevance: dict[str, dict[str, dict[str, dict[str, np.ndarray]]]] = {}

    total = sum(m.draws * (len(similarities) if m.per_similarity else 1) for m in all_methods)
    done = 0
    if progress is not None:
        progress.update(0, total, "Ranking")
    for method in all_methods:
        key, nd = method.key, method.draws
        d_scores = {s.key: np.full((nd, nq), np.nan) for s in similarities}
        d_ap = {s.key: np.full((nd, nq), np.nan) for s in similarities}
        d_prec = {s.key: np.full((nd, nq), np.nan) for s in similarities}
        d_ret: dict[str, list[list[list[tuple[str, int]]]]] = {s.key: [] for s in similarities}
        d_rel = {
            r: {s.key: {m: np.full((nd, nq), np.nan) for m in ("AP", "P", "mP")} for s in similarities}
            for r in rel_tables
        }
        t0 = time.perf_counter()
        # A per-similarity method ranks once per similarity; a single-embedding method ranks once and that
        # ranking is scored for every similarity.
        rankings: list[tuple[Similarity | None, list[Similarity]]] = (
            [(s, [s]) for s in similarities] if method.per_similarity else [(None, similarities)]
        )
        for sim, scored in rankings:
            for d in range(nd):
                ranked = method.rank(ctx, sim, d)
                for s in scored:
                    dice, ap_d, prec_d, named = _score_ranking(
                        ctx, key, ranked, tables[s.score], ref_tumour, n_relevant
                    )
                    d_scores[s.key][d], d_ap[s.key][d], d_prec[s.key][d] = dice, ap_d, prec_d
                    for r, table in rel_tables.items():
                        for metric, values in _relevance_scores(ctx, ranked, table, rel_counts[r]).items():
                            d_rel[r][s.key][metric][d] = values
                    d_ret[s.key].append(named)
                done += 1
                if progress is not None:
                    progress.update(done, total, "Ranking")
        seconds[key] = time.perf_counter() - t0
        scores[key] = {c: v.mean(axis=0) for c, v in d_scores.items()}
        ap[key] = {c: _nanmean0(v) for c, v in d_ap.items()}
        prec[key] = {c: v.mean(axis=0) for c, v in d_prec.items()}
        retrieved[key] = {c: v[0] for c, v in d_ret.items()}
        relevance[key] = {
            r: {c: {metric: _nanmean0(v) for metric, v in ms.items()} for c, ms in cols.items()}
            for r, cols in d_rel.items()
        }
        if nd > 1:
            draw_scores[key] = d_scores
            draw_retrieved[key] = d_ret

    settings = {
        "database": str(db.path),
        "data": None if data_dir is None else str(data_dir),
        "model_fingerprint": bundle.fingerprint,
        "model_path": str(getattr(bundle, "path", "")),
        "image_size": bundle.preprocess.image_size,
        "top": top,
        "distances": list(distances),
        "axial_context": [list(c) for c in AXIAL_CONTEXT] if context else None,
        "baselines": [m.key for m in extra if m.kind == "baseline"],
        "other_methods": [m.key for m in extra if m.kind != "baseline"],
        "draws": draws,
        "seed": seed,
        "leave_one_out": leave_one_out,
        "num_queries": nq,
        "num_reference_volumes": len(case_names),
        "num_reference_slices": n,
        "query_selection": selection,
        "level_tolerance": level_tolerance,
    }
    return RetrievalEvaluation(
        queries=[q.info for q in qslices],
        top=top,
        k_effective=k_eff,
        scores=scores,
        ap=ap,
        precision=prec,
        retrieved=retrieved,
        search_seconds=seconds,
        settings=settings,
        notes=notes,
        methods={m.key: MethodInfo.of(m) for m in all_methods},
        draw_scores=draw_scores,
        draw_retrieved=draw_retrieved,
        cases=used_cases,
        relevance=relevance,
    )


def _score_ranking(
    ctx: RankingContext,
    key: str,
    ranked: Sequence[np.ndarray],
    table: np.ndarray,
    ref_tumour: np.ndarray,
    n_relevant: Sequence[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[tuple[str, int]]]]:
    """Per query: mean Dice of the ranked rows under ``table`` (Nq, N), AP@k, P@k, and the named results
    (case, slice). Checks the method kept to the protocol (at most k results, never the own volume)."""
    nq = ctx.num_queries
    if len(ranked) != nq:
        raise DataError(f"ranking method {key}: {len(ranked)} rankings for {nq} queries")
    dice, ap, prec = np.full(nq, np.nan), np.full(nq, np.nan), np.full(nq, np.nan)
    named: list[list[tuple[str, int]]] = []
    for qi, rows in enumerate(ranked):
        rows = np.asarray(rows, dtype=np.int64)
        own, k = ctx.own_volume[qi], ctx.k[qi]
        vols = ctx.row_volume[rows]
        if (
            rows.size > k
            or (own is not None and bool(np.any(vols == own)))
            or np.unique(vols).size < rows.size
        ):
            raise DataError(
                f"ranking method {key}: query {ctx.query_case_ids[qi]} got {rows.size} results; the "
                f"protocol allows at most {k}, one slice per volume, never the query's own volume"
            )
        if rows.size:
            dice[qi] = float(table[qi, rows].mean())
        rel = ref_tumour[rows]
        ap[qi] = average_precision_at_k(rel, k, n_relevant[qi])
        prec[qi] = precision_at_k(rel, k)
        named.append([(str(ctx.case_names[v]), int(ctx.slice_indices[r])) for r, v in zip(rows, vols)])
    return dice, ap, prec, named


def _relevant_volumes(table: np.ndarray, starts: np.ndarray, own: Sequence[int | None]) -> list[int]:
    """Per query: candidate volumes (own excluded) holding at least one relevant row of ``table`` (Nq, N)."""
    nv = len(starts) - 1
    per_volume = np.zeros((table.shape[0], nv), dtype=bool)
    for v in range(nv):
        lo, hi = int(starts[v]), int(starts[v + 1])
        if hi > lo:
            per_volume[:, v] = table[:, lo:hi].any(axis=1)
    counts = []
    for q, o in enumerate(own):
        c = int(per_volume[q].sum())
        if o is not None and per_volume[q, o]:
            c -= 1
        counts.append(c)
    return counts


def _relevance_scores(
    ctx: RankingContext, ranked: Sequence[np.ndarray], table: np.ndarray, n_relevant: Sequence[int]
) -> dict[str, np.ndarray]:
    """Per query AP@k, P@k and mP@1..k of the ranked rows under the relevance ``table`` (Nq, N)."""
    nq = ctx.num_queries
    out = {m: np.full(nq, np.nan) for m in ("AP", "P", "mP")}
    for qi, rows in enumerate(ranked):
        rows = np.asarray(rows, dtype=np.int64)
        rel = table[qi, rows]
        k = ctx.k[qi]
        out["AP"][qi] = average_precision_at_k(rel, k, n_relevant[qi])
        out["P"][qi] = precision_at_k(rel, k)
        out["mP"][qi] = mean_precision_1_to_k(rel, k)
    return out


def _nanmean0(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN where every entry is NaN (AP undefined for that query)."""
    ok = ~np.isnan(values)
    count = ok.sum(axis=0)
    total = np.where(ok, values, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ---------------------------------------------------------------------------------------------- report


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def ordered_methods(result: RetrievalEvaluation, summary: dict[str, Any]) -> list[str]:
    """Methods in table order: FDN distances, other embeddings, baselines, oracle."""
    rank = {"fdn": 0, "embedding": 1, "baseline": 2, "oracle": 3}
    methods = list(summary)
    return sorted(methods, key=lambda m: (rank.get(result.info(m).kind, 1), methods.index(m)))


def method_table_rows(
    result: RetrievalEvaluation, with_std: bool = True
) -> tuple[list[str], list[list[str]]]:
    """(similarity columns, rows) of the one table of every method: per cell ``mean ± std (ratio)``, the
    ratio to the oracle; for multi-draw methods the ratio carries ``± std over draws``."""
    summary = result.summary()
    methods = ordered_methods(result, summary)
    cols = list(summary[methods[0]]) if methods else []
    rows = []
    for m in methods:
        info = result.info(m)
        label = info.label + (f" [{info.draws} draws]" if info.draws > 1 else "")
        cells = []
        for c in cols:
            e = summary[m][c]
            dice = f"{_fmt(e['mean_dice'])} ± {_fmt(e['std_dice'])}" if with_std else _fmt(e["mean_dice"])
            ratio = _fmt(e["ratio_to_oracle"], ".2f")
            if e.get("ratio_draw_std") is not None:
                ratio += f" ± {_fmt(e['ratio_draw_std'], '.2f')}"
            cells.append(f"{dice} ({ratio})")
        rows.append([label, *cells])
    return cols, rows


def margin_lines(result: RetrievalEvaluation) -> list[str]:
    """One plain sentence per similarity: does the best FDN distance beat the best trivial baseline, and by
    how much (difference and quotient of the ratios to the oracle, queries won / lost)."""
    lines = []
    for col, m in result.margins().items():
        f, b = result.info(m["best_fdn"]).label, result.info(m["best_baseline"]).label
        verdict = "beats" if m["fdn_beats_baseline"] else "does NOT beat"
        quotient = "n/a" if m["ratio_of_ratios"] is None else f"{m['ratio_of_ratios']:.2f}x"
        lines.append(
            f"{col}: FDN {verdict} the best trivial baseline - best FDN {f} {m['best_fdn_ratio']:.3f} of the "
            f"oracle vs {b} {m['best_baseline_ratio']:.3f}: margin {m['difference']:+.3f} ({quotient}); "
            f"FDN higher on {m['queries_fdn_higher']}, lower on {m['queries_fdn_lower']}, equal on "
            f"{m['queries_equal']} of {len(result.queries)} queries."
        )
    return lines


def relevance_table_rows(result: RetrievalEvaluation, relevance: str) -> tuple[list[str], list[list[str]]]:
    """(similarity columns, rows) of ``mAP@k / P@k / mP@1..k`` under one relevance definition."""
    summary = result.summary()
    methods = ordered_methods(result, summary)
    cols = list(summary[methods[0]]) if methods else []
    k = result.top
    rows = []
    for m in methods:
        cells = []
        for c in cols:
            e = summary[m][c]
            keys = (f"mAP@{k}[{relevance}]", f"P@{k}[{relevance}]", f"mP@1..{k}[{relevance}]")
            cells.append(" / ".join(_fmt(e.get(key)) for key in keys))
        rows.append([result.info(m).label, *cells])
    return cols, rows


def relevance_markdown(result: RetrievalEvaluation) -> list[str]:
    """Markdown lines: one table of mAP@k / P@k / mP@1..k per relevance definition (``RELEVANCES``)."""
    if not result.relevance:
        return []
    k = result.top
    tol = result.settings.get("level_tolerance")
    lines = [
        "",
        f"## Ranking metrics by relevance: mAP@{k} / P@{k} / mP@1..{k}",
        "",
        f"mP@1..{k} is the mean of P@1..P@{k} (what seed 003 calls MAP). Level tolerance: {tol}. Methods "
        "with one embedding rank once: their three columns are the same ranking.",
    ]
    for rel, text in RELEVANCES.items():
        cols, rows = relevance_table_rows(result, rel)
        lines += ["", f"### Relevance `{rel}`: {text}", "", "| Method | " + " | ".join(cols) + " |"]
        lines += ["|---|" + "---|" * len(cols), *(f"| {' | '.join(r)} |" for r in rows)]
    return lines


def markdown_report(result: RetrievalEvaluation) -> str:
    """Table-2-like markdown: one table of every method (mean ± std Dice, ratio to the oracle), the margin of
    the FDN over the trivial baselines per similarity, and mAP@k / P@k."""
    summary = result.summary()
    methods = ordered_methods(result, summary)
    cols, rows = method_table_rows(result)
    k = result.top
    header = "| Method | " + " | ".join(cols) + " |"
    rule = "|---|" + "---|" * len(cols)
    s = result.settings
    data = f" from `{s['data']}`" if s.get("data") else ""
    lines = [
        "# Retrieval evaluation (Kobayashi et al. 2021, section 4.4.6 / Table 2 protocol)",
        "",
        f"- database: `{s['database']}` ({s['num_reference_volumes']} volumes, "
        f"{s['num_reference_slices']} slices){data}",
        f"- model: `{s['model_fingerprint'][:16]}`, image size {s['image_size']}",
        f"- queries: {s['num_queries']} ({s['query_selection']}), largest-tumour slice of each",
        f"- volume-wise top-{k}, own volume excluded; every method on the same queries and references",
        "",
        f"## Mean Dice of the top-{k}: mean ± std over queries (ratio to the oracle)",
        "",
        header,
        rule,
        *(f"| {' | '.join(r)} |" for r in rows),
        "",
        "Random baselines: mean over their seeded draws; the ratio's ± is the std over draws.",
    ]
    margins = margin_lines(result)
    if margins:
        lines += ["", "## FDN against the best trivial baseline (ratios to the oracle)", ""]
        lines += [f"- {line}" for line in margins]
    lines += [
        "",
        f"## mAP@{k} / P@{k} (relevance: the retrieved slice has tumour labels)",
        "",
        header,
        rule,
    ]
    for m in methods:
        cells = [f"{_fmt(summary[m][c][f'mAP@{k}'])} / {_fmt(summary[m][c][f'P@{k}'])}" for c in cols]
        lines.append(f"| {result.info(m).label} | " + " | ".join(cells) + " |")
    lines += relevance_markdown(result)
    lines += ["", "## Definitions", "", *(f"- **{name}**: {text}" for name, text in DEFINITIONS.items())]
    if result.notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in result.notes)]
    secs = ", ".join(f"{result.info(m).label} {t:.2f} s" for m, t in result.search_seconds.items())
    lines += ["", f"Ranking time for all queries and similarities: {secs}.", ""]
    return "\n".join(lines)


def write_retrieval_report(result: RetrievalEvaluation, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``retrieval_eval.json`` and ``retrieval_eval.md`` into ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "retrieval_eval.json", out_dir / "retrieval_eval.md"
    atomic_write_json(json_path, result.to_dict())
    atomic_write_bytes(md_path, markdown_report(result).encode("utf-8"))
    return json_path, md_path
