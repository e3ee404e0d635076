"""K x K code-to-code tables: every slice distance of the search engine is a per-position sum over one.

Because a slice's latent is a grid of indices into a codebook ``e`` (K x D), any quantity that is a sum
over grid positions of a function of two code vectors only needs that function tabulated once for all
K x K pairs of codes:

- ``squared_euclidean_table``: ``||e_i - e_j||^2`` (Euclidean distance of flattened latents, squared),
- ``dot_table``: ``e_i . e_j`` (numerator of the cosine; its diagonal gives the squared norms),
- ``hamming_table``: number of differing bits between binarised code vectors ``b_i`` and ``b_j``.
"""

from __future__ import annotations

import numpy as np

from fdn_core.errors import DataError

__all__ = ["check_codebook", "dot_table", "hamming_table", "squared_euclidean_table"]


def check_codebook(codebook: np.ndarray, what: str = "codebook") -> np.ndarray:
    """Return ``codebook`` as a finite float64 (K, D) array, or raise DataError saying what is wrong."""
    arr = np.asarray(codebook)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(f"{what}: expected a (K, D) array of code vectors, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{what}: expected floating-point code vectors, got dtype {arr.dtype}")
    if arr.shape[0] > 65536:
        raise DataError(f"{what}: {arr.shape[0]} codes do not fit uint16 code indices (at most 65536)")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{what}: contains NaN or infinite values; the model that made it is broken")
    return arr.astype(np.float64)


def squared_euclidean_table(codebook: np.ndarray, block: int = 64) -> np.ndarray:
    """(K, K) float64 table of ``||e_i - e_j||^2``, computed from differences (no cancellation)."""
    e = check_codebook(codebook)
    k = e.shape[0]
    out = np.empty((k, k), dtype=np.float64)
    for start in range(0, k, block):
        diff = e[start : start + block, None, :] - e[None, :, :]
        out[start : start + block] = np.einsum("ijd,ijd->ij", diff, diff)
    return out


def dot_table(codebook: np.ndarray) -> np.ndarray:
    """(K, K) float64 table of ``e_i . e_j``."""
    e = check_codebook(codebook)
    return e @ e.T


def _as_bits(bits: np.ndarray) -> np.ndarray:
    arr = np.asarray(bits)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(f"binarised codebook: expected a (K, B) array of bits, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"binarised codebook: expected bool or integer bits, got dtype {arr.dtype}")
    values = np.unique(arr)
    if np.isin(values, (0, 1)).all():
        return arr > 0
    if np.isin(values, (-1, 1)).all():  # the paper's sgn() convention
        return arr > 0
    raise DataError(
        f"binarised codebook: bits must be bool, {{0, 1}} or {{-1, +1}}; found values {values[:6].tolist()}"
    )


def hamming_table(bits: np.ndarray) -> np.ndarray:
    """(K, K) table of Hamming distances between the rows of a binarised codebook ``bits`` (K, B).

    ``bits`` may be bool, {0, 1} or the paper's {-1, +1} signs. The result is uint16 when B < 65536,
    else uint32. Counted as ``|b_i| + |b_j| - 2 b_i.b_j`` with a float32 matrix product, which is exact
    because every partial sum is an integer below 2^24 (B is at most K(K-1)/2 = 130,816 for K = 512).
    """
    b = _as_bits(bits)
    if b.shape[1] >= 1 << 24:
        raise DataError(f"binarised codebook: {b.shape[1]} bits per code is more than this table supports")
    f = b.astype(np.float32)
    ones = f.sum(axis=1, dtype=np.float64)
    dots = (f @ f.T).astype(np.float64)
    dist = np.rint(ones[:, None] + ones[None, :] - 2.0 * dots)
    dtype = np.uint16 if b.shape[1] < 65536 else np.uint32
    return dist.astype(dtype)
