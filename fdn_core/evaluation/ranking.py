"""Ranking methods of the retrieval evaluation: the FDN distances, trivial baselines, the oracle, and any
other slice-embedding method, behind one small interface.

A ``RankingMethod`` is asked, per query and similarity, for the rows of its volume-wise top-k (each reference
volume's single best slice, volumes in rank order, never the query's own volume). The evaluation loop
(``fdn_core.evaluation.retrieval_eval.evaluate_retrieval``) scores every method's rows with the same
ground-truth Dice, so all methods land in one table.

- ``per_similarity``: True when the method ranks differently for S_normal, S_abnormal and S_sum (the FDN
  distances: one search mode each; the oracle: one objective each). False for a method with a single
  embedding (the baselines, SimSiam-like embeddings, hash codes): its one ranking is scored three ways.
- ``draws``: how many seeded draws a random method makes; its scores are averaged over draws and the spread
  of the draw means is reported.
- Hooks ``observe_query`` / ``observe_reference`` hand a method the model-input slices (z-scored, resized;
  ``(Z, 4, S, S)``) as the loop loads each volume, so a method that embeds images (``SliceEmbeddingMethod``)
  never loads anything itself. ``rank`` then gets a ``RankingContext`` describing queries and references.

A new embedding method (e.g. SimSiam features, Y-Net hash codes) subclasses ``SliceEmbeddingMethod`` and
implements ``embed(images) -> (n, F)`` with ``metric`` "l2", "cosine" or "hamming" (0/1 features); it is
passed to ``evaluate_retrieval(..., methods=[...])`` and appears in every table beside the FDN.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np

from fdn_core.errors import ConfigError, DataError
from fdn_core.labels import AXIAL_CONTEXT, DISTANCE_LABELS

if TYPE_CHECKING:
    from fdn_core.retrieval import Retriever

__all__ = [
    "BASELINES",
    "SIMILARITIES",
    "FDNDistance",
    "LevelPrior",
    "MethodKind",
    "Oracle",
    "PooledPixels",
    "RandomSlices",
    "RankingContext",
    "RankingMethod",
    "Similarity",
    "SliceEmbeddingMethod",
    "context_key",
    "make_baselines",
    "volume_wise_best",
]

MethodKind = Literal["fdn", "baseline", "oracle", "embedding"]


@dataclass(frozen=True)
class Similarity:
    """One table column: its key, the search engine's mode, and the score: "anatomy" Dice, "tumour" Dice or
    "mean" = (anatomy + tumour) / 2 (the oracle maximises the same quantity)."""

    key: str
    mode: str
    score: str


#: The table's columns, in order.
SIMILARITIES: tuple[Similarity, ...] = (
    Similarity("S_normal", "normal", "anatomy"),
    Similarity("S_abnormal", "abnormal", "tumour"),
    Similarity("S_sum", "sum", "mean"),
    Similarity("S_sum_normalized", "sum_normalized", "mean"),
)


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


@dataclass
class RankingContext:
    """Queries and references of one evaluation, as every ranking method sees them.

    References are the database rows ``0..N-1``, grouped by volume: ``volume_starts`` (V+1,) bounds each
    volume's rows, ``row_volume`` (N,) gives each row's volume, ``slice_indices`` (N,) its axial index, and
    ``volume_depth`` (V,) each volume's number of axial slices. Per query ``q``: ``own_volume[q]`` (its own
    volume, excluded; None when not in the database), ``k[q]`` (results to return), ``query_slice[q]`` and
    ``query_depth[q]``, and the FDN codes ``query_codes[q] = (normal, abnormal)`` grids. ``scores`` maps
    "anatomy" / "tumour" / "mean" to the (Nq, N) ground-truth Dice (the oracle's objective, and the scores
    every method is judged by; ranking methods other than the oracle must not use it).
    """

    top: int
    query_case_ids: list[str]
    query_slice: list[int]
    query_depth: list[int]
    query_codes: list[tuple[np.ndarray, np.ndarray]]
    own_volume: list[int | None]
    k: list[int]
    case_names: list[str]
    volume_starts: np.ndarray
    volume_depth: np.ndarray
    row_volume: np.ndarray
    slice_indices: np.ndarray
    scores: dict[str, np.ndarray]
    #: Per query, the normal grids of its axial context (``labels.AXIAL_CONTEXT``), or None.
    query_context: list[np.ndarray | None] = field(default_factory=list)

    @property
    def num_queries(self) -> int:
        """Number of queries."""
        return len(self.query_case_ids)

    @property
    def num_rows(self) -> int:
        """Number of reference slices (database rows)."""
        return int(self.row_volume.size)

    def candidate_volumes(self, q: int) -> np.ndarray:
        """Volume numbers query ``q`` may retrieve (every volume but its own)."""
        vols = np.arange(len(self.case_names))
        own = self.own_volume[q]
        return vols if own is None else vols[vols != own]

    def volume_wise(self, values: np.ndarray, q: int, higher_is_better: bool = False) -> np.ndarray:
        """Volume-wise top-``k[q]`` rows for query ``q`` from (N,) per-row ``values`` (default: distances)."""
        return volume_wise_best(values, self.row_volume, self.k[q], higher_is_better, self.own_volume[q])


class RankingMethod(ABC):
    """A way to rank the reference slices for each query (see the module docstring)."""

    #: Result key (JSON) and display label.
    key: str = ""
    label: str = ""
    kind: MethodKind = "embedding"
    #: One ranking per similarity (True) or one ranking scored for every similarity (False).
    per_similarity: bool = False
    #: Seeded draws (random methods); scores are averaged over draws.
    draws: int = 1
    #: One line for the report's definitions.
    description: str = ""

    def observe_query(self, q: int, images: np.ndarray, slice_index: int) -> None:  # noqa: B027 (optional hook)
        """Called once per query ``q`` with its volume's model-input slices (Z, 4, S, S) and its slice."""

    def observe_reference(self, volume: int, rows: slice, images: np.ndarray) -> None:  # noqa: B027 (optional hook)
        """Called once per reference volume with the model-input slices (n, 4, S, S) of database ``rows``."""

    @abstractmethod
    def rank(self, ctx: RankingContext, similarity: Similarity | None, draw: int) -> list[np.ndarray]:
        """Per query, the rows of its volume-wise top-``ctx.k[q]`` in rank order. ``similarity`` is None for
        methods that are not ``per_similarity``; ``draw`` counts ``0..draws-1``."""


# -------------------------------------------------------------------------------------- FDN and oracle


def context_key(distance: str) -> str:
    """Result key of a distance searched with axial context (``FDNDistance(..., context=True)``)."""
    return f"{distance}+context"


class FDNDistance(RankingMethod):
    """The FDN's code search with one distance (D_E, D_A, D_H, D_L): the search engine's volume-wise top-k."""

    kind: MethodKind = "fdn"
    per_similarity = True
    _LABELS: ClassVar[dict[str, str]] = DISTANCE_LABELS

    def __init__(self, retriever: Retriever, distance: str, context: bool = False) -> None:
        if distance not in self._LABELS:
            raise ConfigError(f"unknown distance {distance!r}; choose one of {list(self._LABELS)}")
        self.retriever = retriever
        self.distance, self.context = distance, context
        self.key = context_key(distance) if context else distance
        self.label = self._LABELS[distance] + (" + axial context" if context else "")
        self.description = f"FDN code search, {distance} distance between code grids" + (
            "; the normal term over the query's axial context (slices at offsets "
            f"{[o for o, _ in AXIAL_CONTEXT]}, weights {[w for _, w in AXIAL_CONTEXT]})"
            if context
            else ""
        )

    def rank(self, ctx: RankingContext, similarity: Similarity | None, draw: int) -> list[np.ndarray]:
        """Volume-wise top-k of every query by the database's code distance."""
        from fdn_core.codes.search import Query

        assert similarity is not None
        around = ctx.query_context or [None] * ctx.num_queries
        queries = [
            Query(normal, abnormal, exclude_cases=(cid,), normal_context=a if self.context else None)
            for (normal, abnormal), cid, a in zip(ctx.query_codes, ctx.query_case_ids, around, strict=True)
        ]
        hits = self.retriever.engine.search_many(
            queries,
            distance=self.distance,
            mode=similarity.mode,
            top=ctx.top,
            per="volume",
            context=self.context,
        )
        return [np.asarray([h.row for h in hq], dtype=np.int64) for hq in hits]


class Oracle(RankingMethod):
    """Brutal search: ranks by the reported ground-truth score itself (the technical upper bound)."""

    key = "oracle"
    label = "Oracle (brutal search)"
    kind: MethodKind = "oracle"
    per_similarity = True
    description = "brutal search: volume-wise top-k ranked by the reported score itself, from ground truth"

    def rank(self, ctx: RankingContext, similarity: Similarity | None, draw: int) -> list[np.ndarray]:
        """Volume-wise top-k of every query by the score itself (ground truth)."""
        assert similarity is not None
        table = ctx.scores[similarity.score]
        return [ctx.volume_wise(table[q], q, higher_is_better=True) for q in range(ctx.num_queries)]


# --------------------------------------------------------------------------------------------- baselines


class _RandomVolumes(RankingMethod):
    """Shared part of the random baselines: ``k`` distinct random candidate volumes per query, seeded."""

    kind: MethodKind = "baseline"
    _salt = 0

    def __init__(self, seed: int = 0, draws: int = 10) -> None:
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ConfigError(f"{type(self).__name__}: draws must be a positive integer, got {draws!r}")
        self.seed = int(seed)
        self.draws = draws

    def _rng(self, draw: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._salt, draw])

    def _volumes(self, ctx: RankingContext, q: int, rng: np.random.Generator) -> np.ndarray:
        candidates = ctx.candidate_volumes(q)
        return rng.choice(candidates, size=min(ctx.k[q], candidates.size), replace=False)

    @abstractmethod
    def _row(self, ctx: RankingContext, q: int, volume: int, rng: np.random.Generator) -> int:
        """The row of ``volume`` that stands for it in query ``q``'s ranking."""

    def rank(self, ctx: RankingContext, similarity: Similarity | None, draw: int) -> list[np.ndarray]:
        rng = self._rng(draw)
        out = []
        for q in range(ctx.num_queries):
            vols = self._volumes(ctx, q, rng)
            out.append(np.asarray([self._row(ctx, q, int(v), rng) for v in vols], dtype=np.int64))
        return out


class RandomSlices(_RandomVolumes):
    """``random``: k random reference volumes (own excluded), a uniformly random slice of each."""

    key = "random"
    label = "Random (random slice, random volumes)"
    description = "k distinct random reference volumes, a random slice of each (seeded; mean over draws)"
    _salt = 1

    def _row(self, ctx: RankingContext, q: int, volume: int, rng: np.random.Generator) -> int:
        lo, hi = int(ctx.volume_starts[volume]), int(ctx.volume_starts[volume + 1])
        return int(rng.integers(lo, hi))


class LevelPrior(_RandomVolumes):
    """``level prior``: k random reference volumes, the slice at the query's axial level in each (the same
    index when the volumes have as many slices; otherwise the same relative position, rounded)."""

    key = "level_prior"
    label = "Level prior (same axial level, random volumes)"
    description = (
        "k distinct random reference volumes, in each the slice at the query's axial index (scaled by "
        "relative position when slice counts differ; seeded; mean over draws)"
    )
    _salt = 2

    @staticmethod
    def target_index(query_slice: int, query_depth: int, volume_depth: int) -> int:
        """The axial index in a volume of ``volume_depth`` slices at the query's relative position."""
        if query_depth == volume_depth or query_depth <= 1:
            return min(int(query_slice), max(volume_depth - 1, 0))
        return round(query_slice * (volume_depth - 1) / (query_depth - 1))

    def _row(self, ctx: RankingContext, q: int, volume: int, rng: np.random.Generator) -> int:
        lo, hi = int(ctx.volume_starts[volume]), int(ctx.volume_starts[volume + 1])
        target = self.target_index(ctx.query_slice[q], ctx.query_depth[q], int(ctx.volume_depth[volume]))
        return lo + int(np.argmin(np.abs(ctx.slice_indices[lo:hi].astype(np.int64) - target)))


class SliceEmbeddingMethod(RankingMethod):
    """A method that embeds each model-input slice into a vector and ranks by a distance between vectors;
    volume-wise like the FDN (each volume's closest slice). Subclasses implement ``embed``. The reference
    vectors are searched exactly through ``fdn_core.codes.embedding_index.EmbeddingIndex``."""

    #: "l2" (Euclidean), "cosine" (1 - cosine similarity) or "hamming" (count of differing 0/1 features).
    metric: str = "l2"
    #: Search backend of ``fdn_core.codes.embedding_index.EmbeddingIndex``: "auto" (faiss when installed for
    #: l2 / cosine, numpy otherwise; Hamming: packed bits and ``np.bitwise_count``), "faiss" or "numpy".
    backend: str = "auto"

    def __init__(self) -> None:
        self._queries: dict[int, np.ndarray] = {}
        self._refs: dict[int, np.ndarray] = {}

    @abstractmethod
    def embed(self, images: np.ndarray) -> np.ndarray:
        """(n, 4, S, S) float32 model-input slices -> (n, F) features."""

    def observe_query(self, q: int, images: np.ndarray, slice_index: int) -> None:
        """Embed query ``q``'s slice ``slice_index`` of ``images``."""
        self._queries[q] = np.asarray(self.embed(images[slice_index : slice_index + 1]))[0]

    def observe_reference(self, volume: int, rows: slice, images: np.ndarray) -> None:
        """Embed reference volume ``volume``'s slices (database ``rows``)."""
        feats = np.asarray(self.embed(images))
        if feats.shape[0] != rows.stop - rows.start:
            raise DataError(f"{self.key}: embed returned {feats.shape[0]} rows for {rows.stop - rows.start}")
        self._refs[int(rows.start)] = feats

    def reference_matrix(self, num_rows: int) -> np.ndarray:
        """(N, F) features of every database row, in row order."""
        parts = [self._refs[s] for s in sorted(self._refs)]
        ref = np.concatenate(parts) if parts else np.zeros((0, 0))
        if ref.shape[0] != num_rows:
            raise DataError(f"{self.key}: {ref.shape[0]} reference slices embedded, {num_rows} expected")
        return ref

    def distances(self, query: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """(N,) float64 distances of every reference row to one query vector (through ``EmbeddingIndex``)."""
        from fdn_core.codes.embedding_index import EmbeddingIndex

        return EmbeddingIndex(ref, self.metric, backend=self.backend).distances(query[None])[0]

    def rank(self, ctx: RankingContext, similarity: Similarity | None, draw: int) -> list[np.ndarray]:
        """Volume-wise top-k of every query by the embedding distance."""
        from fdn_core.codes.embedding_index import EmbeddingIndex

        missing = [q for q in range(ctx.num_queries) if q not in self._queries]
        if missing:
            raise DataError(f"{self.key}: queries {missing} were never embedded")
        index = EmbeddingIndex(self.reference_matrix(ctx.num_rows), self.metric, backend=self.backend)
        queries = np.stack([np.asarray(self._queries[q]) for q in range(ctx.num_queries)])
        dist = index.distances(queries)
        return [ctx.volume_wise(dist[q], q) for q in range(ctx.num_queries)]


class PooledPixels(SliceEmbeddingMethod):
    """``pooled pixels``: L2 between the z-scored model-input slices (all 4 channels) average-pooled to the
    code grid size (e.g. 8x8)."""

    key = "pooled_pixels"
    kind: MethodKind = "baseline"
    metric = "l2"
    backend = "numpy"  # float64, exact: its ranking does not depend on whether faiss is installed

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        h, w = (int(g) for g in grid)
        if h < 1 or w < 1:
            raise ConfigError(f"pooled pixels: grid {grid} must be positive")
        self.grid = (h, w)
        self.label = f"Pooled pixels (L2, {h}x{w}x4)"
        self.description = (
            f"L2 distance between the z-scored model-input slices, all 4 channels, average-pooled to "
            f"{h}x{w} (the code grid); each volume's closest slice"
        )

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Z-score and average-pool the slices to the code grid."""
        import torch
        from torch.nn.functional import adaptive_avg_pool2d

        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if x.ndim != 4:
            raise DataError(f"pooled pixels: expected (n, C, H, W) slices, got shape {tuple(x.shape)}")
        pooled = adaptive_avg_pool2d(x.double(), self.grid)
        return pooled.reshape(pooled.shape[0], -1).numpy()


#: The trivial baselines, by key.
BASELINES: tuple[str, ...] = ("random", "level_prior", "pooled_pixels")


def make_baselines(
    names: Sequence[str], grid: tuple[int, int], draws: int = 10, seed: int = 0
) -> list[RankingMethod]:
    """The named trivial baselines (``BASELINES``); random ones use ``draws`` seeded draws."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline(s) {unknown}; choose among {list(BASELINES)}")
    made: list[RankingMethod] = []
    for name in dict.fromkeys(names):
        if name == "random":
            made.append(RandomSlices(seed=seed, draws=draws))
        elif name == "level_prior":
            made.append(LevelPrior(seed=seed, draws=draws))
        else:
            made.append(PooledPixels(grid))
    return made
