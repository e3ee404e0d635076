"""Exact search over one vector per slice (the baselines' embeddings), beside the FDN's code-grid engine.

The FDN's ``SearchEngine`` scans code grids through per-position K x K tables; a SimSiam feature vector or a
64-bit Y-Net hash is not a grid of codebook indices, so it gets this flat index instead (no approximation):

- ``metric="l2"`` / ``"cosine"``: vectors (cosine: rows L2-normalised once, distance 1 - cos) in a faiss
  ``IndexFlatL2`` / ``IndexFlatIP`` (float32) when faiss is installed (the ``faiss`` extra), otherwise numpy
  (float64 input stays float64). Both give the same distances up to float rounding.
- ``metric="hamming"``: 0/1 vectors packed 8 per byte (``np.packbits``); distances are ``np.bitwise_count``
  of the XOR, summed over bytes: 8 bytes per slice for a 64-bit code.

``distances(queries)`` returns every row's distance (the volume-wise evaluation needs each volume's best
row, not only a global top-k); ``search(queries, k)`` the k nearest rows.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import numpy as np

from fdn_core.errors import ConfigError, DataError

__all__ = ["EmbeddingIndex", "Metric", "faiss_available"]

Metric = Literal["l2", "cosine", "hamming"]
METRICS: tuple[str, ...] = ("l2", "cosine", "hamming")


def faiss_available() -> bool:
    """Whether the faiss package can be imported here."""
    return importlib.util.find_spec("faiss") is not None


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


class EmbeddingIndex:
    """Flat exact index of ``vectors`` (N, F) under ``metric`` (module docstring). ``backend``: "auto"
    (faiss when installed, for l2 / cosine), "faiss" or "numpy"."""

    def __init__(self, vectors: np.ndarray, metric: str, backend: str = "auto") -> None:
        if metric not in METRICS:
            raise ConfigError(f"unknown metric {metric!r}; use one of {list(METRICS)}")
        if backend not in ("auto", "faiss", "numpy"):
            raise ConfigError(f"unknown backend {backend!r}; use auto, faiss or numpy")
        v = np.asarray(vectors)
        if v.ndim != 2:
            raise DataError(f"embedding index: vectors must be (N, F), got shape {v.shape}")
        self.metric = metric
        self.num_rows, self.dim = int(v.shape[0]), int(v.shape[1])
        self._faiss: Any = None
        self._data: np.ndarray[Any, Any]
        if metric == "hamming":
            if v.size and not np.isin(v, (0, 1)).all():
                raise DataError("hamming index: vectors must hold 0/1 values")
            self.backend = "numpy"
            self._data = np.asarray(np.packbits(v.astype(np.uint8), axis=1))
            return
        use_faiss = backend == "faiss" or (backend == "auto" and faiss_available())
        if backend == "faiss" and not faiss_available():
            raise ConfigError("backend 'faiss' requested but faiss is not installed (pip install faiss-cpu)")
        self.backend = "faiss" if use_faiss else "numpy"
        # faiss works in float32; the numpy path keeps float64 input exact (e.g. pooled pixels)
        dtype = np.float64 if (not use_faiss and v.dtype == np.float64) else np.float32
        data: Any = np.ascontiguousarray(v, dtype=dtype)
        if metric == "cosine":
            data = _normalise(data)
        self._data = data
        if use_faiss:
            import faiss

            index: Any = faiss.IndexFlatL2(self.dim) if metric == "l2" else faiss.IndexFlatIP(self.dim)
            index.add(data)
            self._faiss = index

    @property
    def bytes_per_row(self) -> int:
        """Storage per slice: 4 bytes per float, or the packed bits."""
        return int(self._data.shape[1] * self._data.itemsize)

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DataError(f"queries of shape {q.shape} do not match the index's {self.dim} features")
        return q

    def distances(self, queries: np.ndarray) -> np.ndarray:
        """(Nq, N) float64 distance of every row to every query: L2 (not squared), 1 - cos, or differing
        bits."""
        q = self._queries(queries)
        if self.metric == "hamming":
            packed = np.packbits(q.astype(np.uint8), axis=1)
            out = np.empty((q.shape[0], self.num_rows), dtype=np.float64)
            for i, row in enumerate(packed):
                out[i] = np.bitwise_count(np.bitwise_xor(self._data, row)).sum(axis=1)
            return out
        qf: np.ndarray[Any, Any] = np.ascontiguousarray(q, dtype=self._data.dtype)
        if self.metric == "cosine":
            qf = _normalise(qf)
        if self._faiss is not None and self.num_rows:
            scores, labels = self._faiss.search(qf, self.num_rows)
            full = np.empty((qf.shape[0], self.num_rows), dtype=np.float64)
            np.put_along_axis(full, labels.astype(np.int64), scores.astype(np.float64), axis=1)
            if self.metric == "l2":
                return np.sqrt(np.maximum(full, 0.0))
            return 1.0 - full
        ref = self._data.astype(np.float64, copy=False)
        if self.metric == "l2":  # direct differences: exact, no cancellation
            out = np.empty((qf.shape[0], self.num_rows), dtype=np.float64)
            for i, row in enumerate(qf.astype(np.float64)):
                diff = ref - row
                out[i] = np.sqrt(np.einsum("nf,nf->n", diff, diff))
            return out
        return 1.0 - qf.astype(np.float64) @ ref.T

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, rows) of the ``k`` nearest rows per query, nearest first (ties: lower row first)."""
        if k < 1:
            raise DataError(f"k must be >= 1, got {k}")
        d = self.distances(queries)
        k = min(k, self.num_rows)
        rows = (
            np.stack([np.lexsort((np.arange(d.shape[1]), di))[:k] for di in d]) if d.size else d.astype(int)
        )
        return np.take_along_axis(d, rows, axis=1), rows
