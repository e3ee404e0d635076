"""The paper's retrieval evaluation (section 4.4.6, Table 2), its oracle, and mAP@k.

Protocol (what ``evaluate_retrieval`` does)
-------------------------------------------
- Query volumes: the cases named by the caller, or every case of the data folder that is not in the
  database (a held-out split) - in both cases only volumes with a tumour. The query slice of a volume is the
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
- mAP@k (k = Q): relevance of a retrieved slice is "has abnormal" (any tumour label at the model's resolution)
  equal to the query's (all protocol queries have a tumour, so relevant = the retrieved slice shows tumour).
  ``AP@k = sum_{i<=k} P@i * rel_i / min(k, R)`` where ``P@i`` is the precision of the first i results and R is
  the number of relevant candidates (volume-wise: reference volumes with at least one relevant slice;
  slice-wise: relevant reference slices); queries with R = 0 are left out (AP undefined). mAP@k is the mean of
  AP@k over queries. ``P@k`` (precision of the k results) is reported beside it.

Labels are the cohort's at the model resolution (``volume_to_slices`` with the bundle's preprocess config), so
the Dice compares exactly the slices the codes were computed from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fdn_core.errors import DataError, ModelMismatchError
from fdn_core.evaluation.metrics import dice_matrix
from fdn_core.fileio import atomic_write_bytes, atomic_write_json
from fdn_core.labels import ABNORMAL_CLASSES, ANATOMY_CLASSES, DISTANCES

if TYPE_CHECKING:
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.model.bundle import InferenceBundle
    from fdn_core.progress import Progress

__all__ = [
    "COLUMNS",
    "DEFINITIONS",
    "ORACLE",
    "QueryInfo",
    "RetrievalEvaluation",
    "average_precision_at_k",
    "evaluate_retrieval",
    "largest_tumour_slice",
    "markdown_report",
    "oracle_volume_wise",
    "precision_at_k",
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


def volume_wise_best(
    scores: np.ndarray,
    row_volume: np.ndarray,
    k: int,
    higher_is_better: bool,
    exclude_volume: int | None = None,
) -> np.ndarray:
    """Rows of the volume-wise top-``k``: each volume's best row, volumes ranked by that row's score.

    ``row_volume`` gives each row's volume number; rows of ``exclude_volume`` are never returned. Ties go to
    the earlier row (within a volume and between volumes), so the result is deterministic.
    """
    scores = np.asarray(scores, dtype=np.float64)
    row_volume = np.asarray(row_volume)
    if scores.shape != row_volume.shape or scores.ndim != 1:
        raise DataError(
            f"volume_wise_best: scores {scores.shape} and row volumes {row_volume.shape} must be 1-D alike"
        )
    rows = np.arange(scores.size)
    if exclude_volume is not None:
        rows = rows[row_volume != exclude_volume]
    key = -scores[rows] if higher_is_better else scores[rows]
    order = rows[np.lexsort((rows, key))]
    _, first = np.unique(row_volume[order], return_index=True)
    return order[np.sort(first)][:k]


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


# -------------------------------------------------------------------------------------------- protocol

#: Table columns: (key, engine search mode, score, oracle objective). Scores: "anatomy" Dice, "tumour" Dice,
#: "mean" = (anatomy + tumour) / 2; the oracle maximises the same quantity (for "mean" equivalently the sum).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("S_normal", "normal", "anatomy"),
    ("S_abnormal", "abnormal", "tumour"),
    ("S_sum", "sum", "mean"),
    ("S_sum_normalized", "sum_normalized", "mean"),
)
ORACLE = "oracle"
_METHOD_NAMES = {"euclidean": "D_E", "angular": "D_A", "hamming": "D_H", ORACLE: "Oracle (brutal search)"}


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
    (NaN where undefined), ``retrieved[method][column]`` lists each query's (case, slice) results in rank
    order; methods are the distances and ``"oracle"``, columns the keys of ``COLUMNS`` that could be scored.
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

    def summary(self) -> dict[str, Any]:
        """Mean +- std (ddof=0) over queries of each score, its ratio to the oracle, mAP@k and P@k."""
        out: dict[str, Any] = {}
        for method, cols in self.scores.items():
            out[method] = {}
            for col, values in cols.items():
                mean, std = _mean_std(values)
                oracle_mean = _mean_std(self.scores[ORACLE][col])[0] if ORACLE in self.scores else math.nan
                ap = self.ap[method][col]
                out[method][col] = {
                    "mean_dice": mean,
                    "std_dice": std,
                    "ratio_to_oracle": mean / oracle_mean
                    if oracle_mean and not math.isnan(oracle_mean)
                    else None,
                    f"mAP@{self.top}": _mean_std(ap)[0],
                    f"mAP@{self.top}_queries": int(np.count_nonzero(~np.isnan(ap))),
                    f"P@{self.top}": _mean_std(self.precision[method][col])[0],
                }
        return _nan_to_none(out)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON: settings, notes, summary and per-query results."""
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
                entry["results"][method] = {
                    col: {
                        "dice": float(cols[col][i]),
                        f"AP@{self.top}": float(self.ap[method][col][i]),
                        f"P@{self.top}": float(self.precision[method][col][i]),
                        "retrieved": [[c, int(s)] for c, s in self.retrieved[method][col][i]],
                    }
                    for col in cols
                }
            per_query.append(entry)
        return _nan_to_none(
            {
                "settings": self.settings,
                "definitions": DEFINITIONS,
                "notes": self.notes,
                "summary": self.summary(),
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
    "mAP@k": "mean over queries of AP@k = sum_{i<=k} P@i rel_i / min(k, R); rel_i: result i has tumour "
    "labels (as the query does); R: reference volumes with at least one tumour slice; queries with R = 0 "
    "left out",
    "P@k": "share of the k results with tumour labels (k = min(top, number of reference volumes))",
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
    normal: np.ndarray
    abnormal: np.ndarray
    seg: np.ndarray
    anat: np.ndarray | None


def _score_table(kind: str, anatomy: np.ndarray | None, tumour: np.ndarray) -> np.ndarray:
    if kind == "tumour":
        return tumour
    assert anatomy is not None
    return anatomy if kind == "anatomy" else (anatomy + tumour) / 2.0


def evaluate_retrieval(
    bundle: InferenceBundle,
    db: CodeDatabase | str | Path,
    data_dir: str | Path,
    queries: Sequence[str] | None = None,
    top: int = 10,
    distances: Sequence[str] = DISTANCES,
    progress: Progress | None = None,
    batch_size: int | None = None,
) -> RetrievalEvaluation:
    """Run the paper's retrieval evaluation (module docstring) of ``bundle``'s database ``db``.

    ``queries``: the query case ids (default: every case of ``data_dir`` that is not in the database).
    Cases are looked up in ``data_dir`` first and otherwise at the source paths the database recorded.
    """
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.codes.search import Query
    from fdn_core.data.preprocess import volume_to_slices
    from fdn_core.data.readers import CaseFiles, find_cases, load_case
    from fdn_core.retrieval import Retriever, load_hamming_codes

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise DataError(f"top must be a positive integer, got {top!r}")
    unknown = [d for d in distances if d not in DISTANCES]
    if unknown or not distances:
        raise DataError(f"distances {list(distances)}: choose among {list(DISTANCES)}")
    if not isinstance(db, CodeDatabase):
        db = CodeDatabase.open(db, expected_fingerprint=bundle.fingerprint)
    elif db.fingerprint != bundle.fingerprint:
        raise ModelMismatchError(
            f"{db.path} was built with model {db.fingerprint[:16]}..., not with the bundle in use "
            f"({bundle.fingerprint[:16]}...); evaluate with the model the database was built with"
        )
    if len(db) == 0:
        raise DataError(f"{db.path} is empty; add reference cases with `fdn index add`")
    data_dir = Path(data_dir)
    cohort = {c.case_id: c for c in find_cases(data_dir)}
    notes: list[str] = []

    # ---- queries
    explicit = queries is not None
    if explicit:
        missing = [q for q in queries if q not in cohort]
        if missing:
            raise DataError(
                f"{data_dir}: query case(s) {missing} not found; check the ids (fdn inspect lists them)"
            )
        query_ids = list(dict.fromkeys(queries))
    else:
        query_ids = [c for c in cohort if c not in db]
        if not query_ids:
            raise DataError(
                f"every case of {data_dir} is in {db.path}, so there is no held-out query case; pass the "
                "query cases explicitly (--queries) or index only part of the cohort"
            )
    retriever = Retriever(db, bundle, load_hamming_codes(db))
    if "hamming" in distances:
        retriever.ensure_hamming(progress)
    qslices: list[_QuerySlice] = []
    if progress is not None:
        progress.update(0, len(query_ids), "Loading query cases")
    for i, cid in enumerate(query_ids, 1):
        case = load_case(cohort[cid])
        if case.seg is None:
            msg = f"query case {cid} has no tumour labels (seg), so its largest-tumour slice is unknown"
            if explicit:
                raise DataError(f"{msg}; give labelled query cases")
            notes.append(f"{msg}: skipped")
        else:
            stack = volume_to_slices(case, bundle.preprocess)
            k, area = largest_tumour_slice(stack.seg)
            if area == 0:
                notes.append(f"query case {cid} has no tumour at the model's resolution: skipped")
            else:
                if cid in db:
                    qs = retriever.slice_from_database(cid, k)
                    normal, abnormal = qs.normal, qs.abnormal
                else:
                    enc = bundle.encode_slices(stack.images[k : k + 1], batch_size=batch_size)
                    normal, abnormal = enc.normal[0], enc.abnormal[0]
                anat = None if stack.anat is None else stack.anat[k]
                qslices.append(
                    _QuerySlice(QueryInfo(cid, k, area, cid in db), normal, abnormal, stack.seg[k], anat)
                )
        if progress is not None:
            progress.update(i, len(query_ids), "Loading query cases")
    if not qslices:
        raise DataError(
            f"no tumour in any query case {query_ids}; the protocol queries with each volume's "
            "largest-tumour slice: give query cases with tumour labels"
        )
    nq = len(qslices)

    # ---- references: ground-truth overlap of every query with every database slice
    n = len(db)
    starts = db.case_starts
    case_names = db.cases
    row_volume = np.repeat(np.arange(len(case_names)), np.diff(starts))
    tumour = np.zeros((nq, n), dtype=np.float64)
    anatomy: np.ndarray | None = np.zeros((nq, n), dtype=np.float64)
    no_anat: list[str] = [q.info.case_id for q in qslices if q.anat is None]
    ref_tumour = np.zeros(n, dtype=bool)
    q_seg = np.stack([q.seg for q in qslices])
    q_anat = None if no_anat else np.stack([q.anat for q in qslices])
    slice_indices = np.asarray(db.slice_indices)
    if progress is not None:
        progress.update(0, len(case_names), "Scoring reference slices")
    for ci, cid in enumerate(case_names):
        files = cohort.get(cid) or CaseFiles.from_source(cid, db.sources(cid))
        case = load_case(files)
        if case.seg is None:
            raise DataError(
                f"reference case {cid} ({files.seg or 'no seg file'}) has no tumour labels; the retrieval "
                "evaluation needs labels for every database case"
            )
        stack = volume_to_slices(case, bundle.preprocess)
        lo, hi = int(starts[ci]), int(starts[ci + 1])
        ks = slice_indices[lo:hi]
        if ks.size and int(ks.max()) >= stack.seg.shape[0]:
            raise DataError(
                f"reference case {cid}: the database holds slice {int(ks.max())} but the volume has "
                f"{stack.seg.shape[0]} slices; the files changed since indexing: re-index the case"
            )
        seg = stack.seg[ks]
        tumour[:, lo:hi] = dice_matrix(q_seg, seg, ABNORMAL_CLASSES)
        ref_tumour[lo:hi] = (seg.reshape(seg.shape[0], -1) > 0).any(axis=1)
        if stack.anat is None:
            no_anat.append(cid)
        if anatomy is not None and not no_anat:
            anatomy[:, lo:hi] = dice_matrix(q_anat, stack.anat[ks], ANATOMY_CLASSES)
        if progress is not None:
            progress.update(ci + 1, len(case_names), "Scoring reference slices")
    columns = list(COLUMNS)
    if no_anat:
        anatomy = None
        columns = [c for c in COLUMNS if c[2] == "tumour"]
        notes.append(
            f"no anatomy labels for {len(no_anat)} case(s) (e.g. {', '.join(no_anat[:5])}): S_normal and "
            "S_sum cannot be scored; only S_abnormal is reported"
        )

    # ---- per query: own volume, relevant volumes, effective k
    vol_index = {c: i for i, c in enumerate(case_names)}
    own = [vol_index.get(q.info.case_id) for q in qslices]
    vol_has_tumour = np.zeros(len(case_names), dtype=bool)
    np.logical_or.at(vol_has_tumour, row_volume, ref_tumour)
    n_relevant = [int(vol_has_tumour.sum()) - (1 if o is not None and vol_has_tumour[o] else 0) for o in own]
    k_eff = [min(top, len(case_names) - (1 if o is not None else 0)) for o in own]
    if min(k_eff) < 1:
        raise DataError(f"{db.path} holds no volume other than the query's own; add reference cases")
    if max(k_eff) < top:
        notes.append(
            f"the database has fewer than {top} reference volumes per query: k = {max(k_eff)} results"
        )

    scores: dict[str, dict[str, np.ndarray]] = {}
    ap: dict[str, dict[str, np.ndarray]] = {}
    prec: dict[str, dict[str, np.ndarray]] = {}
    retrieved: dict[str, dict[str, list[list[tuple[str, int]]]]] = {}
    seconds: dict[str, float] = {}

    def record(method: str, col: str, qi: int, rows: Sequence[int], table: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        scores[method][col][qi] = float(table[qi, rows].mean()) if rows.size else math.nan
        rel = ref_tumour[rows]
        ap[method][col][qi] = average_precision_at_k(rel, k_eff[qi], n_relevant[qi])
        prec[method][col][qi] = precision_at_k(rel, k_eff[qi])
        retrieved[method][col].append([(str(case_names[row_volume[r]]), int(slice_indices[r])) for r in rows])

    methods = [*distances, ORACLE]
    for m in methods:
        scores[m] = {c[0]: np.full(nq, np.nan) for c in columns}
        ap[m] = {c[0]: np.full(nq, np.nan) for c in columns}
        prec[m] = {c[0]: np.full(nq, np.nan) for c in columns}
        retrieved[m] = {c[0]: [] for c in columns}
    engine_queries = [Query(q.normal, q.abnormal, exclude_cases=(q.info.case_id,)) for q in qslices]
    total = len(distances) * len(columns)
    done = 0
    if progress is not None:
        progress.update(0, total, "Searching")
    for dist in distances:
        t0 = time.perf_counter()
        for col, mode, kind in columns:
            table = _score_table(kind, anatomy, tumour)
            hits = retriever.engine.search_many(
                engine_queries, distance=dist, mode=mode, top=top, per="volume"
            )
            for qi, hq in enumerate(hits):
                record(dist, col, qi, [h.row for h in hq], table)
            done += 1
            if progress is not None:
                progress.update(done, total, "Searching")
        seconds[dist] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for col, _mode, kind in columns:
        table = _score_table(kind, anatomy, tumour)
        for qi in range(nq):
            record(ORACLE, col, qi, oracle_volume_wise(table[qi], row_volume, top, own[qi]), table)
    seconds[ORACLE] = time.perf_counter() - t0

    settings = {
        "database": str(db.path),
        "data": str(data_dir),
        "model_fingerprint": bundle.fingerprint,
        "model_path": str(getattr(bundle, "path", "")),
        "image_size": bundle.preprocess.image_size,
        "top": top,
        "distances": list(distances),
        "num_queries": nq,
        "num_reference_volumes": len(case_names),
        "num_reference_slices": n,
        "query_selection": "given" if explicit else "cases of the data folder not in the database",
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
    )


def markdown_report(result: RetrievalEvaluation) -> str:
    """Table-2-like markdown: mean +- std Dice per method and similarity, ratios to the oracle, mAP@k, P@k."""
    summary = result.summary()
    methods = list(summary)
    cols = list(summary[methods[0]]) if methods else []
    k = result.top
    header = "| Method | " + " | ".join(cols) + " |"
    rule = "|---|" + "---|" * len(cols)

    def fmt(v: float | None, spec: str = ".3f") -> str:
        return "n/a" if v is None else format(v, spec)

    def table(cell: Any) -> list[str]:
        lines = [header, rule]
        for m in methods:
            lines.append(
                f"| {_METHOD_NAMES.get(m, m)} | " + " | ".join(cell(summary[m][c]) for c in cols) + " |"
            )
        return lines

    s = result.settings
    lines = [
        "# Retrieval evaluation (Kobayashi et al. 2021, section 4.4.6 / Table 2 protocol)",
        "",
        f"- database: `{s['database']}` ({s['num_reference_volumes']} volumes, "
        f"{s['num_reference_slices']} slices)",
        f"- model: `{s['model_fingerprint'][:16]}`, image size {s['image_size']}",
        f"- queries: {s['num_queries']} ({s['query_selection']}), largest-tumour slice of each",
        f"- volume-wise top-{k}, own volume excluded",
        "",
        f"## Mean Dice of the top-{k} (mean ± std over queries)",
        "",
        *table(lambda e: f"{fmt(e['mean_dice'])} ± {fmt(e['std_dice'])}"),
        "",
        "## Ratio to the oracle (mean Dice / oracle mean Dice)",
        "",
        *table(lambda e: fmt(e["ratio_to_oracle"])),
        "",
        f"## mAP@{k} and P@{k} (relevance: the retrieved slice has tumour labels)",
        "",
        *table(lambda e: f"{fmt(e[f'mAP@{k}'])} / {fmt(e[f'P@{k}'])}"),
        "",
        "## Definitions",
        "",
        *(f"- **{name}**: {text}" for name, text in DEFINITIONS.items()),
    ]
    if result.notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in result.notes)]
    secs = ", ".join(f"{_METHOD_NAMES.get(m, m)} {t:.2f} s" for m, t in result.search_seconds.items())
    lines += ["", f"Search time for all queries and similarities: {secs}.", ""]
    return "\n".join(lines)


def write_retrieval_report(result: RetrievalEvaluation, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``retrieval_eval.json`` and ``retrieval_eval.md`` into ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "retrieval_eval.json", out_dir / "retrieval_eval.md"
    atomic_write_json(json_path, result.to_dict())
    atomic_write_bytes(md_path, markdown_report(result).encode("utf-8"))
    return json_path, md_path
