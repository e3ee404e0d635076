"""K x K code-to-code tables: every slice distance of the search engine is a per-position sum over one.

Because a slice's latent is a grid of indices into a codebook ``e`` (K x D), any quantity that is a sum
over grid positions of a function of two code vectors only needs that function tabulated once for all
K x K pairs of codes:

- ``squared_euclidean_table``: ``||e_i - e_j||^2`` (Euclidean distance of flattened latents, squared),
- ``dot_table``: ``e_i . e_j`` (numerator of the cosine; its diagonal gives the squared norms),
- ``hamming_table``: number of differing bits between binarised code vectors ``b_i`` and ``b_j``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fdn_core.errors import DataError

__all__ = [
    "MAX_UINT16_CODES",
    "check_bits",
    "check_codebook",
    "dot_table",
    "hamming_table",
    "squared_euclidean_table",
]

#: Code indices are stored as uint16: at most 65,536 codes per codebook.
MAX_UINT16_CODES = 1 << 16


def check_codebook(
    codebook: Any, where: str = "codebook", min_codes: int = 1, max_codes: int = MAX_UINT16_CODES
) -> np.ndarray:
    """Return ``codebook`` as a finite float64 (K, D) array with ``min_codes <= K <= max_codes``, or raise
    DataError saying what is wrong (the one codebook check of the search engine, hashing and database)."""
    try:
        arr = np.asarray(codebook)
    except Exception as exc:  # ragged nested lists and the like
        raise DataError(f"{where}: cannot be read as an array ({exc}); pass a (K, D) float array") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(f"{where}: expected a numeric (K, D) array of code vectors, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise DataError(f"{where}: complex values are not supported; pass a real (K, D) array")
    if arr.ndim != 2:
        raise DataError(
            f"{where}: expected a 2-D (K, D) array of K code vectors, got shape {arr.shape}; "
            "reshape it to (num_codes, code_dim)"
        )
    k, d = arr.shape
    if k < min_codes:
        raise DataError(f"{where}: needs at least {min_codes} code vector(s), got K = {k}")
    if k > max_codes:
        limit = "uint16 code indices" if max_codes == MAX_UINT16_CODES else "this operation"
        raise DataError(f"{where}: K = {k} code vectors exceeds the maximum of {max_codes} for {limit}")
    if d < 1:
        raise DataError(f"{where}: code vectors have dimension 0; expected shape (K, D) with D >= 1")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.all(np.isfinite(arr), axis=1))
        raise DataError(
            f"{where}: code vectors {bad[:10].tolist()} contain NaN or infinite values; "
            "the model's codebook is corrupt or was not trained"
        )
    return arr


def check_bits(bits: Any, where: str = "binarised codebook") -> np.ndarray:
    """Return binarised code vectors as a (K, B) bool array, or raise DataError.

    Accepted encodings: bool, {0, 1} integers or floats, and the paper's {-1, +1} signs. B may be 0
    (shortening can keep no bit when every code vector is the same).
    """
    arr = np.asarray(bits)
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise DataError(f"{where}: expected a 2-D (K, B) array of K binary codes, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{where}: bits must be bool, {{0, 1}} or {{-1, +1}}; got dtype {arr.dtype}")
    values = np.unique(arr)
    if np.isin(values, (0, 1)).all() or np.isin(values, (-1, 1)).all():
        return arr > 0
    raise DataError(
        f"{where}: bits must be bool, {{0, 1}} or {{-1, +1}} (integer codes may contain only 0 and 1, or "
        f"the signs -1 and +1); found values {values[:6].tolist()}"
    )


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


def hamming_table(bits: np.ndarray) -> np.ndarray:
    """(K, K) table of Hamming distances between the rows of a binarised codebook ``bits`` (K, B).

    ``bits`` may be bool, {0, 1} or the paper's {-1, +1} signs (all zero when B = 0). The result is
    uint16 when B < 65536, else uint32. Counted as ``|b_i| + |b_j| - 2 b_i.b_j`` with a float32 matrix
    product, which is exact because every partial sum is an integer below 2^24 (B is at most
    K(K-1)/2 = 130,816 for K = 512).
    """
    b = check_bits(bits)
    if b.shape[1] == 0:
        return np.zeros((b.shape[0], b.shape[0]), dtype=np.uint16)
    if b.shape[1] >= 1 << 24:
        raise DataError(f"binarised codebook: {b.shape[1]} bits per code is more than this table supports")
    f = b.astype(np.float32)
    ones = f.sum(axis=1, dtype=np.float64)
    dots = (f @ f.T).astype(np.float64)
    dist = np.rint(ones[:, None] + ones[None, :] - 2.0 * dots)
    dtype = np.uint16 if b.shape[1] < 65536 else np.uint32
    return dist.astype(dtype)
