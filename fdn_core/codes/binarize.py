"""Binary hashing of a VQ codebook by separating hyperplanes, and the exact shortening of the codes.

Paper (Kobayashi et al. 2021), section 3.2 and Algorithm A.1:

* Binarisation (eq. 14-16). Every pair ``(i, j)``, ``i < j``, of code vectors defines the hyperplane that
  bisects them, ``H_ij(x) = (e_i - e_j) . x - (|e_i|^2 - |e_j|^2) / 2``. Code vector ``e_k`` gets the bit
  ``sgn(H_ij(e_k))`` with the paper's convention ``sgn(0) = +1``; here bit ``True`` = ``H >= 0``, i.e.
  ``e_k`` is at least as close to ``e_i`` as to ``e_j``. ``H_ij(e_k)`` is evaluated in the algebraically
  identical form ``(|e_k - e_j|^2 - |e_k - e_i|^2) / 2`` from exactly computed squared distances, so that
  identical vectors get bit-identical codes and a degenerate pair (``e_i == e_j``) gives ``H == 0``
  everywhere: its bit is ``True`` for every vector, carries no information and is always dropped by the
  shortening. Vectors with L2 norm ``< zero_tol`` (paper: 1e-5) are first set to exactly zero, so the
  near-zero ("unused") vectors of a trained codebook become duplicates with identical codes. Bit ``p``
  belongs to the ``p``-th pair in row-major order ``(0,1), (0,2), ..., (0,K-1), (1,2), ...``
  (``np.triu_indices(K, 1)``): ``K(K-1)/2`` bits (130,816 for K = 512).

* Shortening (Algorithm A.1), implemented with the paper's exact semantics: for every code vector ``i``
  the set ``A_i`` of its nearest neighbours in Hamming distance is taken among the vectors ``j > i`` (the
  algorithm's inner loop runs ``j = i+1..K``; ``scope="upper"``, the default) or, optionally, among all
  ``j != i`` (``scope="full"``). A bit may be removed when removing it leaves every ``A_i`` unchanged as
  a set (``nearest="set"``, the default: the algorithm compares "the set of pairs (i, j) that minimise
  the distance", so a removal that creates or breaks a tie is refused). ``nearest="first"`` instead
  preserves only the lowest-index nearest neighbour (what an ``np.argmin`` implementation would do).
  Iteration order: the algorithm restarts from the first remaining bit after each removal
  (``Optimize(b', E')``), i.e. it repeatedly removes the lowest-indexed removable bit until no bit is
  removable; the result is a fixed point where no single remaining bit can be removed.

  Consequence of the set semantics worth knowing: if two different codes tie as nearest neighbours of
  some vector in the full-length code, every bit that separates them must be kept (it would break the
  tie), which can keep thousands of bits; ``nearest="first"`` has no such effect.

  The literal algorithm costs O(E^2 K^2) and is hopeless for K = 512, so this module computes the same
  result another way (own code: no library offers this). Every removal preserves the neighbour sets,
  so they never change, and the condition becomes a set of inequalities over pairs, ``slack(i, j) =
  D[i, j] - D[i, a_i] - t >= 0`` (``a_i`` the reference neighbour, ``t`` 1 for a strict inequality, 0
  where a tie is allowed). Removing bit ``b`` lowers ``slack(i, j)`` by one exactly when ``b`` separates
  ``i`` from ``j`` but not from ``a_i``; a bit is therefore removable iff no *tight* pair (slack 0) has
  that pattern, and bits that distinguish members of a tied neighbour set are never removable. The
  implementation keeps the tight pairs' blocking masks bit-packed over the bits examined so far, takes
  the first unblocked bit (vectorised over runs of removals that leave the tight set unchanged), tracks
  slacks only for the pairs that can reach 0 before the next exact refresh of the Hamming table (XOR and
  popcount over the bits removed in the batch), and works on distinct codes only (identical vectors,
  such as the rounded zero vectors, behave identically). Tests check it against a literal implementation.

Which vectors: like the paper (130,816 bits for K = 512), all K vectors by default, unused ones included
(near-zero ones collapse onto the zero vector). ``used=`` (a mask) or ``usage_counts=`` (the selection
counts a training run recorded: ``InferenceBundle.code_usage()``; ``used_codes`` turns them into the mask)
restricts the pairs, the preserved neighbour sets and the scoring to the vectors a trained model actually
selects; every vector still gets a code.

Dead codes are *excluded*, not set to zero. With the EMA codebook update a code the data never selects is
divided once by its near-zero smoothed count (its norm jumps to ~1e5) and then decays by the EMA decay per
step, so after training it sits anywhere from far outside the data to just above the 1e-5 "zero"
threshold: its position says how long ago it died, nothing about the data. Its bisecting hyperplanes
with the used codes carry no information, yet Algorithm A.1 must keep every bit that preserves its
nearest-neighbour set (measured on the first shipped model: 12,098 of 32,640 abnormal bits, concordance
0.27/0.33/0.44). Setting dead codes to zero instead would make them one vector at the origin, which ties
with, or becomes the nearest neighbour of, used codes near the origin; the paper's "set" semantics then
keep the bits that separate the tie, and every dead code reports perfect concordance with the others
(zero vectors are concordant by construction). Excluded codes still get a code (their side of every
kept hyperplane), so a database that holds one can still be searched.

The report follows section 4.4.5: compression ratio ``E*/E`` and the Jaccard concordance of each vector's
top-1/5/10 neighbours (Hamming on the codes vs Euclidean on the codebook), plus compactness (4.4.4).
Concordance is given three ways: ``concordance`` over the vectors the codes were fitted on (the used
ones, or all), ``concordance_paper`` over all K vectors as the paper defines it (dead and zero vectors
included: zero vectors, identical in both spaces, count as concordant), and ``concordance_used`` over the
used vectors only (the mask, or without one the vectors not rounded to zero).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.spatial.distance import cdist

from fdn_core.codes.tables import check_bits, check_codebook, hamming_table  # shared with the search engine
from fdn_core.errors import ConfigError, DataError, IntegrityError
from fdn_core.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from fdn_core.progress import Progress

__all__ = [
    "MAX_CODES",
    "ZERO_TOL",
    "BinarizationReport",
    "BinaryCodes",
    "binarize_codebook",
    "fit_binary_codes",
    "hamming_table",
    "jaccard_concordance",
    "pair_indices",
    "round_small_vectors",
    "shorten_bits",
    "used_codes",
]

ZERO_TOL = 1e-5
"""Paper: code vectors with L2 norm below this are rounded to the zero vector (and count for compactness)."""

MAX_CODES = 1024
"""Largest codebook accepted: the full code matrix is K * K(K-1)/2 bytes (537 MB at K = 1024)."""

Scope = Literal["upper", "full"]
Nearest = Literal["set", "first"]
_SCOPES = ("upper", "full")
_NEAREST = ("set", "first")
_FORMAT = "fdn-binary-codes"
_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# validation helpers


def _check_codebook(codebook: Any, where: str = "codebook") -> np.ndarray:
    """A finite float64 (K, D) codebook with 2 <= K <= MAX_CODES (a hyperplane needs two vectors)."""
    return check_codebook(codebook, where, min_codes=2, max_codes=MAX_CODES)


def _check_zero_tol(zero_tol: float) -> float:
    if isinstance(zero_tol, bool) or not isinstance(zero_tol, (int, float, np.floating, np.integer)):
        raise ConfigError(f"zero_tol: expected a number, got {zero_tol!r}")
    if not math.isfinite(float(zero_tol)) or zero_tol < 0:
        raise ConfigError(f"zero_tol: must be a finite number >= 0 (paper: 1e-5), got {zero_tol!r}")
    return float(zero_tol)


def _check_scope(scope: str) -> str:
    if scope not in _SCOPES:
        raise ConfigError(
            f"scope: {scope!r} is not one of {list(_SCOPES)} ('upper' = paper's Algorithm A.1, neighbours "
            "j > i; 'full' = all other vectors)"
        )
    return scope


def _check_nearest(nearest: str) -> str:
    if nearest not in _NEAREST:
        raise ConfigError(
            f"nearest: {nearest!r} is not one of {list(_NEAREST)} ('set' = paper: the whole set of nearest "
            "neighbours, ties included; 'first' = the lowest-index nearest neighbour only)"
        )
    return nearest


def _check_used(used: Any, k: int, where: str = "used") -> np.ndarray | None:
    """Validate an optional boolean mask of length K with at least 2 True entries."""
    if used is None:
        return None
    arr = np.asarray(used)
    if arr.dtype != bool:
        raise DataError(f"{where}: expected a boolean mask of length {k}, got dtype {arr.dtype}")
    if arr.shape != (k,):
        raise DataError(f"{where}: expected a boolean mask of shape ({k},), got shape {arr.shape}")
    if int(arr.sum()) < 2:
        raise DataError(
            f"{where}: at least 2 code vectors must be marked as used, got {int(arr.sum())}; "
            "pass used=None to binarise the whole codebook"
        )
    return arr.copy()


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(ks)
    except TypeError as exc:
        raise ConfigError(f"ks: expected a sequence of positive integers, got {ks!r}") from exc
    if not out or any(isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 1 for q in out):
        raise ConfigError(f"ks: expected a non-empty sequence of positive integers, got {ks!r}")
    return tuple(int(q) for q in out)


# ----------------------------------------------------------------------------------------------------
# binarisation


def used_codes(counts: Any, min_count: int = 1) -> np.ndarray | None:
    """The used-code mask of a selection histogram ``counts`` (K,): codes selected at least ``min_count``
    times. None when fewer than 2 codes qualify (no usable mask: binarise the whole codebook)."""
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size < 2 or not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"usage counts: expected a 1-D array of K >= 2 counts, got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise DataError("usage counts: must be finite and non-negative")
    mask = arr >= min_count
    return mask if int(mask.sum()) >= 2 else None


def round_small_vectors(codebook: np.ndarray, zero_tol: float = ZERO_TOL) -> np.ndarray:
    """Copy of ``codebook`` (float64) with every vector of L2 norm ``< zero_tol`` set to exactly zero."""
    cb = _check_codebook(codebook)
    tol = _check_zero_tol(zero_tol)
    out = cb.copy()
    out[np.linalg.norm(cb, axis=1) < tol] = 0.0
    return out


def pair_indices(num_codes: int, used: np.ndarray | None = None) -> np.ndarray:
    """The (E, 2) pairs ``(i, j)``, ``i < j``, in bit order (row-major), among the used vectors if given."""
    if isinstance(num_codes, bool) or not isinstance(num_codes, (int, np.integer)) or num_codes < 2:
        raise ConfigError(f"num_codes: expected an integer >= 2, got {num_codes!r}")
    used_mask = _check_used(used, int(num_codes))
    members = np.arange(num_codes) if used_mask is None else np.flatnonzero(used_mask)
    a, b = np.triu_indices(members.size, 1)
    return np.stack([members[a], members[b]], axis=1).astype(np.int64)


def binarize_codebook(
    codebook: np.ndarray, zero_tol: float = ZERO_TOL, used: np.ndarray | None = None
) -> np.ndarray:
    """Hyperplane codes of every code vector: (K, E) bool, bit ``p`` = side of the ``p``-th pair's bisector.

    ``E = K(K-1)/2`` (pairs among the ``used`` vectors only when a mask is given; every one of the K
    vectors still gets a code). Bit ``True`` means ``H_ij(e_k) >= 0`` (paper's ``sgn(0) = +1``): ``e_k`` is
    at least as close to ``e_i`` as to ``e_j``. Vectors with norm ``< zero_tol`` are first set to zero.
    """
    cb = round_small_vectors(codebook, zero_tol)
    k = cb.shape[0]
    used_mask = _check_used(used, k)
    members = np.arange(k) if used_mask is None else np.flatnonzero(used_mask)
    # cdist computes sum((u - v)^2) directly: exactly 0 for identical vectors and exactly symmetric,
    # which the |u|^2 + |v|^2 - 2 u.v expansion is not.
    sq = cdist(cb, cb, metric="sqeuclidean")
    n = members.size
    bits = np.empty((k, n * (n - 1) // 2), dtype=bool)
    offset = 0
    for a in range(n - 1):
        i = members[a]
        js = members[a + 1 :]
        # H_ij(e_k) = (|e_k - e_j|^2 - |e_k - e_i|^2) / 2 >= 0
        np.greater_equal(sq[:, js], sq[:, i : i + 1], out=bits[:, offset : offset + js.size])
        offset += js.size
    return bits


# ----------------------------------------------------------------------------------------------------
# Hamming distances


def _pack_rows(bits: np.ndarray) -> np.ndarray:
    """(n, B) bool -> (n, max(1, ceil(B/64))) uint64; bit b of a row sits in word b // 64 (little-endian)."""
    n, b = bits.shape
    words = max(1, (b + 63) // 64)
    packed = np.zeros((n, words * 8), dtype=np.uint8)
    packed[:, : (b + 7) // 8] = np.packbits(bits, axis=1, bitorder="little")
    return packed.view("<u8")


def _hamming_packed(packed: np.ndarray) -> np.ndarray:
    """Exact (n, n) int64 Hamming table of bit-packed rows (XOR + popcount, upper triangle mirrored).

    Integer popcounts rather than a BLAS product: exact by construction, and single-threaded numpy
    does not collapse when other processes compete for the cores (multi-threaded BLAS did, 30x).
    """
    n, w = packed.shape
    out = np.zeros((n, n), dtype=np.int64)
    step = max(1, (1 << 21) // max(1, n * w))
    for s in range(0, n, step):
        blk = packed[s : s + step]
        out[s : s + step, s:] = np.bitwise_count(blk[:, None, :] ^ packed[None, s:, :]).sum(
            axis=2, dtype=np.int64
        )
    upper = np.triu(out, 1)
    return upper + upper.T


# ----------------------------------------------------------------------------------------------------
# shortening (Algorithm A.1)


def _scope_mask(n: int, scope: str) -> np.ndarray:
    if scope == "upper":
        return np.triu(np.ones((n, n), dtype=bool), 1)
    return ~np.eye(n, dtype=bool)


def _nearest_sets(table: np.ndarray, scope: str) -> np.ndarray:
    """(n, n) bool: ``A[i, j]`` = j is one of i's nearest neighbours (within the scope) in ``table``."""
    mask = _scope_mask(table.shape[0], scope)
    big = np.iinfo(np.int64).max
    t = np.where(mask, table.astype(np.int64), big)
    return mask & (t == t.min(axis=1, keepdims=True))


def _blocking_masks(packed: np.ndarray, pi: np.ndarray, pj: np.ndarray, pa: np.ndarray) -> np.ndarray:
    """Per pair (i, j, a), the packed bits that differ between i and j but not between i and a:
    removing one lowers D[i, j] - D[i, a] by one."""
    xi = packed[pi]
    return (xi ^ packed[pj]) & ~(xi ^ packed[pa])


def _constraints(
    table: np.ndarray, cls: np.ndarray, scope: str, nearest: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """The inequalities Algorithm A.1 must keep true, from the initial (n, n) Hamming table.

    ``cls[i]`` is the index of vector i's code among the distinct codes (identical vectors share a
    code and behave identically whatever bits are removed). Returns ``(ui, uj, ua, thr, equal_sets)``
    over distinct codes: every removal must keep ``D[ui, uj] - D[ui, ua] >= thr`` (``ua`` = the code of
    the row's reference nearest neighbour) and, in "set" mode, keep the distances from code ``g[0]``
    to the codes ``g[1:]`` equal for each ``g`` in ``equal_sets`` (a tie among nearest neighbours
    must survive). Each distinct constraint is listed once.
    """
    n = table.shape[0]
    mask = _scope_mask(n, scope)
    near = _nearest_sets(table, scope)
    ref = np.argmax(near, axis=1)  # lowest-index nearest neighbour of each row
    if nearest == "set":
        oi, oj = np.nonzero(mask & ~near)  # non-neighbours must stay strictly farther than the neighbours
        thr = np.ones(oi.size, dtype=np.int64)
    else:
        cons = mask.copy()
        cons[np.arange(n), ref] = False
        oi, oj = np.nonzero(cons)
        # j below the reference must stay strictly farther; j above it may tie (argmin keeps the first)
        thr = (oj < ref[oi]).astype(np.int64)
    key = np.stack([cls[oi], cls[oj], cls[ref[oi]], thr], axis=1)
    key = key[key[:, 1] != key[:, 2]]  # j identical to the neighbour: its distance always equals it
    key = np.unique(key, axis=0)
    groups: dict[tuple[int, ...], np.ndarray] = {}
    if nearest == "set":
        for i in np.flatnonzero(near.sum(axis=1) > 1):
            codes = np.unique(cls[near[i]])
            if codes.size > 1:  # a tie between different codes
                g = np.concatenate([[cls[i]], codes])
                groups.setdefault(tuple(g.tolist()), g)
    return key[:, 0], key[:, 1], key[:, 2], key[:, 3], list(groups.values())


def _shorten(
    bits: np.ndarray,
    rows: np.ndarray | None,
    scope: str,
    nearest: str,
    progress: Progress | None,
    *,
    max_horizon: int = 4096,
    pair_budget: int = 4096,
    max_run: int = 64,
    chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Kept bit indices (sorted), the initial (n, n) Hamming table of the participating rows, and the
    number of bits kept only because they separate tied nearest neighbours.

    ``max_horizon`` caps the removals between two exact refreshes of the Hamming table, ``pair_budget``
    the number of constraint pairs tracked removal by removal, ``max_run`` the removals attempted in
    one vectorised step and ``chunk`` the number of new bits examined at once: they change the speed
    only, never the result.
    """
    k, e = bits.shape
    members = np.arange(k) if rows is None else np.flatnonzero(rows)
    # Identical codes (e.g. the zero vectors) behave identically: work on the distinct codes only.
    packed_rows = np.packbits(bits[members], axis=1)
    _, first, cls = np.unique(packed_rows, axis=0, return_index=True, return_inverse=True)
    cls = cls.reshape(-1)
    del packed_rows
    sub = np.ascontiguousarray(bits[members[first]])  # (n, E): one row per distinct code
    n = sub.shape[0]
    cols = np.ascontiguousarray(sub.T).view(np.uint8)  # (E, n): one row per bit
    dist = _hamming_packed(_pack_rows(sub))
    table = dist[np.ix_(cls, cls)]
    oi, oj, oa, thr, equal_sets = _constraints(table, cls, scope, nearest)

    # A bit that differs inside a tie of nearest neighbours would break the tie: it is kept for good.
    frozen = np.zeros(e, dtype=bool)
    for group in equal_sets:
        i, nb = group[0], group[1:]
        x = cols[:, nb] != cols[:, [i]]
        frozen |= np.any(x[:, 1:] != x[:, :1], axis=1)

    removed = np.zeros(e, dtype=bool)
    live = np.flatnonzero(~frozen)  # candidate bits, in index order
    scanned = 0  # live[:scanned] have been examined: each is removed or in the window
    # The window holds the examined, not yet removed candidates, bit-packed per code vector, chunk by
    # chunk (each chunk starts on a fresh 64-bit word); `slot_bit` maps window slots to bit indices.
    win_packed = np.zeros((n, 0), dtype=np.uint64)
    slot_bit = np.zeros(0, dtype=np.int64)
    alive = np.zeros(0, dtype=np.uint64)

    def append_window(new: np.ndarray) -> None:
        nonlocal win_packed, slot_bit, alive
        words = (new.size + 63) // 64
        win_packed = np.concatenate([win_packed, _pack_rows(sub[:, new])[:, :words]], axis=1)
        slots = np.full(words * 64, -1, dtype=np.int64)
        slots[: new.size] = new
        slot_bit = np.concatenate([slot_bit, slots])
        alive = np.concatenate([alive, _pack_rows(np.ones((1, new.size), dtype=bool))[0, :words]])

    done = live.size == 0
    while not done:
        # --- refresh: exact slacks of every constraint, choose the pairs to track this batch
        slack_all = dist[oi, oj] - dist[oi, oa] - thr  # >= 0: every constraint holds
        hist = np.cumsum(np.bincount(np.minimum(slack_all, max_horizon + 1), minlength=max_horizon + 2))
        # the largest horizon h with at most `pair_budget` pairs of slack <= h (at least 1)
        horizon = max(1, min(max_horizon, int(np.searchsorted(hist, pair_budget, side="right")) - 1))
        track = np.flatnonzero(slack_all <= horizon)  # others cannot reach 0 within `horizon` removals
        ci, cj, ca = oi[track], oj[track], oa[track]
        slack = slack_all[track]
        tight = slack == 0
        if alive.size and np.bitwise_count(alive).sum() < 0.75 * np.count_nonzero(slot_bit >= 0):
            kept_slots = slot_bit[slot_bit >= 0]
            kept_slots = kept_slots[~removed[kept_slots]]
            win_packed, slot_bit, alive = np.zeros((n, 0), dtype=np.uint64), slot_bit[:0], alive[:0]
            append_window(kept_slots)
        # blocking masks of the tracked pairs, computed when a pair first turns tight: the window bits
        # that differ between i and j but not between i and its nearest neighbour a (removing one
        # would bring j as near as a)
        mask_row = np.full(track.size, -1, dtype=np.int64)
        store = np.zeros((0, win_packed.shape[1]), dtype=np.uint64)
        stored = np.zeros(0, dtype=np.int64)

        blocked = None
        batch: list[int | np.ndarray] = []
        budget = horizon
        run = 1
        while budget > 0:
            if blocked is None:
                t = np.flatnonzero(tight)
                missing = t[mask_row[t] < 0]
                if missing.size:
                    mask_row[missing] = np.arange(stored.size, stored.size + missing.size)
                    store = np.concatenate(
                        [store, _blocking_masks(win_packed, ci[missing], cj[missing], ca[missing])]
                    )
                    stored = np.concatenate([stored, missing])
                blocked = np.bitwise_or.reduce(store[mask_row[t]], axis=0) if t.size else np.zeros_like(alive)
            free = alive & ~blocked
            words = np.flatnonzero(free)
            if words.size == 0:
                # nothing removable among the examined bits: examine the next chunk of candidates
                new = live[scanned : scanned + chunk]
                if new.size == 0:
                    done = True  # no removable bit left: the fixed point of Algorithm A.1
                    break
                scanned += new.size
                lo = win_packed.shape[1]
                append_window(new)
                if stored.size:
                    store = np.concatenate(
                        [store, _blocking_masks(win_packed[:, lo:], ci[stored], cj[stored], ca[stored])],
                        axis=1,
                    )
                else:
                    store = np.zeros((0, win_packed.shape[1]), dtype=np.uint64)
                blocked = None
                continue
            if run == 1 or budget == 1:
                w = int(words[0])
                value = int(free[w])
                low = value & -value
                alive[w] = np.uint64(int(alive[w]) ^ low)
                b = int(slot_bit[w * 64 + low.bit_length() - 1])
                c = cols[b]
                xi = c[ci]
                path = slack - (xi != c[cj]).view(np.int8) + (xi != c[ca]).view(np.int8)
                new_tight = path == 0
                batch.append(b)
                budget -= 1
                slack = path
                if np.array_equal(new_tight, tight):
                    run = 2
                else:
                    tight = new_tight
                    blocked = None
                continue
            # several removals at once: removing the free bits in index order is what the paper's
            # restart loop does as long as the set of tight pairs stays the same
            words = words[: min(run, budget)]
            slots = np.flatnonzero(np.unpackbits(free[words].view(np.uint8), bitorder="little"))
            slots = (words[slots >> 6] * 64 + (slots & 63))[: min(run, budget)]
            cand = slot_bit[slots]
            c = cols[cand]
            near = np.flatnonzero(slack <= cand.size)  # only these can turn tight within the run
            xi = c[:, ci[near]]
            step = (xi != c[:, cj[near]]).view(np.int8) - (xi != c[:, ca[near]]).view(np.int8)
            path = slack[near] - np.cumsum(step, axis=0, dtype=np.int32)
            changed = np.flatnonzero(((path == 0) != tight[near]).any(axis=1))
            last = int(changed[0]) if changed.size else cand.size - 1
            taken = slots[: last + 1]
            np.bitwise_and.at(alive, taken >> 6, ~(np.uint64(1) << (taken & 63).astype(np.uint64)))
            batch.append(cand[: last + 1])
            budget -= last + 1
            # the removed bits (at most 64) as one word per code: popcounts give every pair's change
            word = np.zeros((8, n), dtype=np.uint8)
            word[: (last + 8) // 8] = np.packbits(c[: last + 1], axis=0, bitorder="little")
            word = np.ascontiguousarray(word.T).view("<u8")[:, 0]
            wi = word[ci]
            slack = slack - np.bitwise_count(wi ^ word[cj]) + np.bitwise_count(wi ^ word[ca])
            if changed.size:
                tight = slack == 0
                blocked = None
                run = 1
            else:
                run = min(2 * run, max_run, 64)  # a run must fit in one 64-bit word

        if batch:
            gone_bits = np.concatenate([np.atleast_1d(x) for x in batch])
            removed[gone_bits] = True
            dist -= _hamming_packed(_pack_rows(sub[:, np.sort(gone_bits)]))
            if not np.array_equal(dist[ci, cj] - dist[ci, ca] - thr[track], slack):
                raise RuntimeError("internal error: incremental Hamming slacks diverged from the exact table")
        if progress is not None:
            progress.update(int(live[scanned - 1]) + 1 if scanned else 0, e, "shortening binary codes")
    if progress is not None:
        progress.update(e, e, "shortening binary codes")
    return np.flatnonzero(~removed), table, int(frozen.sum())


def shorten_bits(
    bits: np.ndarray,
    progress: Progress | None = None,
    *,
    scope: Scope = "upper",
    nearest: Nearest = "set",
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted indices of the bits Algorithm A.1 keeps (the exact result of the paper's procedure).

    ``scope="upper"`` (paper): the neighbours of vector ``i`` are the vectors ``j > i``; ``"full"``: all
    ``j != i``. ``nearest="set"`` (paper): the whole set of nearest neighbours must stay the same (ties
    included); ``"first"``: only the lowest-index nearest neighbour (what ``np.argmin`` returns) must.
    ``rows`` (bool mask of length K) restricts the vectors whose neighbours are preserved, and the
    candidate neighbours, to the marked (used) vectors.
    """
    arr = check_bits(bits)
    _check_scope(scope)
    _check_nearest(nearest)
    used = _check_used(rows, arr.shape[0], where="rows")
    kept, _, _ = _shorten(arr, used, scope, nearest, progress)
    return kept


def _neighbours_preserved(before: np.ndarray, after: np.ndarray, scope: str, nearest: str) -> bool:
    """Whether two Hamming tables give the same nearest neighbours (the invariant of Algorithm A.1)."""
    nb, na = _nearest_sets(before, scope), _nearest_sets(after, scope)
    if nearest == "set":
        return bool(np.array_equal(nb, na))
    return bool(np.array_equal(np.argmax(nb, axis=1), np.argmax(na, axis=1)))


# ----------------------------------------------------------------------------------------------------
# concordance


def _neighbour_order(dist: np.ndarray) -> np.ndarray:
    """(n, n-1): each row's other items by increasing distance, ties broken by the lower index."""
    n = dist.shape[0]
    order = np.argsort(dist, axis=1, kind="stable")  # stable: equal distances keep index order
    return order[order != np.arange(n)[:, None]].reshape(n, n - 1)


def _mean_jaccard(order_a: np.ndarray, order_b: np.ndarray, q: int) -> float:
    """Mean over rows of the Jaccard index of the first ``q`` entries of two neighbour orders."""
    n = order_a.shape[0]
    q = min(q, n - 1)
    rows = np.arange(n)[:, None]
    in_a = np.zeros((n, n), dtype=bool)
    in_b = np.zeros((n, n), dtype=bool)
    in_a[rows, order_a[:, :q]] = True
    in_b[rows, order_b[:, :q]] = True
    inter = (in_a & in_b).sum(axis=1)
    return float(np.mean(inter / (2 * q - inter)))


def jaccard_concordance(
    codebook: np.ndarray,
    bits: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    used: np.ndarray | None = None,
) -> dict[int, float]:
    """Mean Jaccard index of each vector's top-k neighbours by Hamming (bits) and by Euclidean (codebook).

    For every vector (every used vector when ``used`` is given) the other vectors (used ones) are
    ranked by distance; ties are broken by the lower index, on both sides, so the result is
    deterministic. ``k`` larger than the number of other vectors is clipped to it.
    """
    cb = _check_codebook(codebook)
    arr = check_bits(bits)
    qs = _check_ks(ks)
    if arr.shape[0] != cb.shape[0]:
        raise DataError(
            f"bits: has {arr.shape[0]} codes but the codebook has {cb.shape[0]} vectors; "
            "pass the codes made from this codebook"
        )
    used_mask = _check_used(used, cb.shape[0])
    members = np.arange(cb.shape[0]) if used_mask is None else np.flatnonzero(used_mask)
    eucl = _neighbour_order(cdist(cb[members], cb[members], metric="euclidean"))
    ham = _neighbour_order(_hamming_packed(_pack_rows(arr[members])))
    return {q: _mean_jaccard(eucl, ham, q) for q in qs}


# ----------------------------------------------------------------------------------------------------
# fitted codes, report, persistence


@dataclass
class BinarizationReport:
    """What binarisation and shortening did to one codebook (paper section 4.4.4-4.4.5)."""

    num_codes: int
    num_used: int
    code_dim: int
    zero_tol: float
    scope: str  # "upper" (paper: neighbours j > i) or "full"
    nearest: str  # "set" (paper: all tied nearest neighbours) or "first"
    bits_before: int
    bits_after: int
    tie_kept_bits: int  # kept only because they separate tied nearest neighbours ("set" semantics)
    compression_ratio: float  # E*/E (paper: 0.60 % normal, 0.22 % abnormal)
    compactness: float  # share of the K vectors with norm < zero_tol
    num_zero_vectors: int
    num_distinct_codes: int  # among the used vectors, after shortening
    concordance_before: dict[int, float]  # full-length codes vs Euclidean (paper: 0.82/0.86/0.89)
    concordance: dict[int, float]  # shortened codes vs Euclidean (paper: 0.81/0.89/0.90)
    nearest_preserved: bool  # every nearest-neighbour set of the scope is identical after shortening
    runtime_s: float
    shorten_runtime_s: float
    codebook_sha256: str = ""
    # Over all K vectors, as the paper defines it (dead and zero vectors included).
    concordance_paper: dict[int, float] = field(default_factory=dict)
    # Over the used vectors only (the mask, or the vectors not rounded to zero); {} when fewer than 2.
    concordance_used: dict[int, float] = field(default_factory=dict)

    #: Fields added after reports were first saved: older files may lack them.
    _OPTIONAL = ("codebook_sha256", "concordance_paper", "concordance_used")
    _CONCORDANCES = ("concordance_before", "concordance", "concordance_paper", "concordance_used")

    @property
    def bits_share_of_pairs(self) -> float:
        """Kept bits as a share of K(K-1)/2, all pairs of the K vectors (the paper's E; ``compression_ratio``
        divides by the pairs actually binarised, fewer when unused codes are excluded)."""
        pairs = self.num_codes * (self.num_codes - 1) // 2
        return self.bits_after / pairs if pairs else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (concordance keys become strings)."""
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for key in self._CONCORDANCES:
            d[key] = {str(q): v for q, v in getattr(self, key).items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "report") -> BinarizationReport:
        """Inverse of ``to_dict``; unknown or missing keys are errors (except fields newer than the file)."""
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a mapping, got {type(d).__name__}")
        names = set(cls.__dataclass_fields__)
        unknown, missing = set(d) - names, names - set(d) - set(cls._OPTIONAL)
        if unknown or missing:
            raise DataError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        kw = dict(d)
        try:
            for key in cls._CONCORDANCES:
                if key in d:
                    kw[key] = {int(q): float(v) for q, v in d[key].items()}
        except (AttributeError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: malformed concordance entry ({exc})") from exc
        return cls(**kw)

    def summary(self) -> str:
        """One line for logs and the CLI."""

        def fmt(conc: dict[int, float]) -> str:
            return "/".join(f"{v:.2f}" for v in conc.values()) if conc else "n/a"

        ks = "/".join(map(str, self.concordance))
        used = "" if self.num_used == self.num_codes else f" ({self.num_used} of {self.num_codes} codes used)"
        both = ""
        if self.concordance_paper:
            both = f" (all K, paper: {fmt(self.concordance_paper)}; used only: {fmt(self.concordance_used)})"
        return (
            f"{self.bits_before} -> {self.bits_after} bits ({100 * self.compression_ratio:.2f} %){used}, "
            f"concordance top-{ks} {fmt(self.concordance)}{both}, "
            f"compactness {self.compactness:.2f}, {self.runtime_s:.1f} s"
        )


def _count_distinct(bits: np.ndarray) -> int:
    if bits.shape[1] == 0:
        return 1
    return int(np.unique(np.packbits(bits, axis=1), axis=0).shape[0])


def _npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a .npy file (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _codebook_digest(codebook: np.ndarray) -> str:
    cb = np.ascontiguousarray(codebook, dtype=np.float64)
    h = hashlib.sha256(f"{cb.shape[0]}x{cb.shape[1]}:".encode())
    h.update(cb.tobytes())
    return h.hexdigest()


@dataclass
class BinaryCodes:
    """Shortened binary codes of a codebook: ``bits[k]`` is the code of code vector ``k``.

    ``kept_pairs[b] = (i, j)``: bit ``b`` is the side of the bisector of ``e_i`` and ``e_j``.
    """

    bits: np.ndarray  # (K, B) bool
    kept_pairs: np.ndarray  # (B, 2) int64
    report: BinarizationReport
    used: np.ndarray | None = field(default=None)  # (K,) bool mask the codes were fitted on, or None

    def __post_init__(self) -> None:
        self.bits = check_bits(self.bits)
        pairs = np.asarray(self.kept_pairs)
        k, b = self.bits.shape
        if pairs.shape != (b, 2) or not np.issubdtype(pairs.dtype, np.integer):
            raise DataError(
                f"kept_pairs: expected an integer ({b}, 2) array, got {pairs.dtype} {pairs.shape}"
            )
        if b and (pairs.min() < 0 or pairs.max() >= k or np.any(pairs[:, 0] >= pairs[:, 1])):
            raise DataError(f"kept_pairs: every pair must be (i, j) with 0 <= i < j < {k}")
        self.kept_pairs = pairs.astype(np.int64)
        if self.used is not None:
            self.used = _check_used(self.used, k)

    @property
    def num_codes(self) -> int:
        """K."""
        return int(self.bits.shape[0])

    @property
    def num_bits(self) -> int:
        """B = E*."""
        return int(self.bits.shape[1])

    def hamming_table(self) -> np.ndarray:
        """(K, K) uint16 Hamming distances between the codes (see ``hamming_table``); all zero if B = 0."""
        return hamming_table(self.bits)

    def matches(self, codebook: np.ndarray) -> bool:
        """Whether these codes were fitted on exactly this codebook."""
        return self.report.codebook_sha256 == _codebook_digest(_check_codebook(codebook))

    def save(self, directory: str | Path, name: str = "binary_codes") -> Path:
        """Write ``<name>.bits.npy``, ``<name>.pairs.npy`` and ``<name>.json`` (hashes) atomically."""
        directory = Path(directory)
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ConfigError(f"name: {name!r} must be a plain file-name stem")
        bits_path = directory / f"{name}.bits.npy"
        pairs_path = directory / f"{name}.pairs.npy"
        # np.save into a real file writes through C stdio and loses a full disk's error: write the bytes here
        atomic_write_bytes(bits_path, _npy_bytes(np.packbits(self.bits, axis=1, bitorder="little")))
        atomic_write_bytes(pairs_path, _npy_bytes(np.ascontiguousarray(self.kept_pairs, dtype=np.int64)))
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "num_codes": self.num_codes,
            "num_bits": self.num_bits,
            "bit_packing": "numpy.packbits(axis=1, bitorder='little')",
            "bits_file": bits_path.name,
            "bits_sha256": sha256_file(bits_path),
            "pairs_file": pairs_path.name,
            "pairs_sha256": sha256_file(pairs_path),
            "used": None if self.used is None else np.flatnonzero(self.used).tolist(),
            "report": self.report.to_dict(),
        }
        json_path = directory / f"{name}.json"
        atomic_write_json(json_path, meta)  # written last: it vouches for the two arrays
        return json_path

    @classmethod
    def load(cls, directory: str | Path, name: str = "binary_codes") -> BinaryCodes:
        """Read codes written by ``save``; hashes are verified (IntegrityError on mismatch)."""
        directory = Path(directory)
        json_path = directory / f"{name}.json"
        if not json_path.is_file():
            raise DataError(f"{json_path}: binary codes not found; fit them first (fit_binary_codes + save)")
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{json_path}: unreadable ({exc}); re-create the binary codes") from exc
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise DataError(
                f"{json_path}: not a version-{_VERSION} {_FORMAT} file; re-create the binary codes"
            )
        try:
            k, b = int(meta["num_codes"]), int(meta["num_bits"])
            arrays = []
            for key in ("bits", "pairs"):
                path = directory / str(meta[f"{key}_file"])
                if Path(meta[f"{key}_file"]).name != meta[f"{key}_file"] or not path.is_file():
                    raise DataError(f"{json_path}: {key} file {meta[f'{key}_file']!r} is missing")
                if sha256_file(path) != meta[f"{key}_sha256"]:
                    raise IntegrityError(
                        f"{path}: content does not match the hash in {json_path.name} "
                        "(truncated, tampered or from another fit); re-create the binary codes"
                    )
                arrays.append(np.load(path, allow_pickle=False))
            packed, pairs = arrays
            used_list = meta["used"]
            report = BinarizationReport.from_dict(meta["report"], where=f"{json_path}: report")
        except KeyError as exc:
            raise DataError(f"{json_path}: missing key {exc}; re-create the binary codes") from exc
        except ValueError as exc:
            raise DataError(f"{json_path}: malformed content ({exc}); re-create the binary codes") from exc
        if packed.dtype != np.uint8 or packed.shape != (k, (b + 7) // 8):
            raise DataError(
                f"{json_path}: bits array has shape {packed.shape}, expected ({k}, {(b + 7) // 8})"
            )
        bits = np.unpackbits(packed, axis=1, count=b, bitorder="little").astype(bool)
        used = None
        if used_list is not None:
            idx = np.asarray(used_list)
            if (
                idx.ndim != 1
                or not np.issubdtype(idx.dtype, np.integer)
                or (idx.size and not (idx.min() >= 0 and idx.max() < k))
            ):
                raise DataError(f"{json_path}: 'used' must list code indices in [0, {k})")
            used = np.zeros(k, dtype=bool)
            used[idx] = True
        try:
            return cls(bits=bits, kept_pairs=pairs, report=report, used=used)
        except DataError as exc:
            raise DataError(f"{json_path}: {exc}; re-create the binary codes") from exc


def _concordance_views(
    cb: np.ndarray, bits: np.ndarray, used: np.ndarray | None, zero: np.ndarray, qs: tuple[int, ...]
) -> dict[str, dict[int, float]]:
    """Concordance of the shortened codes over all K vectors (paper) and over the used, non-zero ones."""
    paper = jaccard_concordance(cb, bits, qs)
    members = (np.ones(len(cb), dtype=bool) if used is None else used) & ~zero
    used_only = jaccard_concordance(cb, bits, qs, used=members) if members.sum() >= 2 else {}
    return {"paper": paper, "used": used_only}


def fit_binary_codes(
    codebook: np.ndarray,
    progress: Progress | None = None,
    *,
    zero_tol: float = ZERO_TOL,
    used: np.ndarray | None = None,
    usage_counts: np.ndarray | None = None,
    scope: Scope = "upper",
    nearest: Nearest = "set",
    ks: Sequence[int] = (1, 5, 10),
) -> BinaryCodes:
    """Binarise ``codebook`` (K, D), shorten the codes (Algorithm A.1) and measure the result.

    The paper binarises all K vectors (``used=None``): near-zero vectors become identical zero vectors
    whose codes coincide. With a ``used`` mask (or ``usage_counts``, the selection counts of training:
    codes never selected are excluded, see the module docstring) only pairs of used vectors give bits and
    only the used vectors' neighbour sets are preserved and scored; unused vectors still get a code (their
    side of every kept hyperplane). Concordance is measured on the zero-rounded codebook, i.e. on the very
    points that were binarised; the report has it over the fitted vectors, over all K (the paper's
    definition) and over the used vectors only.
    """
    t0 = time.perf_counter()
    raw = _check_codebook(codebook)
    tol = _check_zero_tol(zero_tol)
    _check_scope(scope)
    _check_nearest(nearest)
    qs = _check_ks(ks)
    if usage_counts is not None:
        if used is not None:
            raise ConfigError("fit_binary_codes: give used= or usage_counts=, not both")
        counts = np.asarray(usage_counts)
        if counts.shape != (raw.shape[0],):
            raise DataError(
                f"usage_counts: has shape {counts.shape} but the codebook has {raw.shape[0]} vectors"
            )
        used = used_codes(counts)
    used_mask = _check_used(used, raw.shape[0])
    if progress is not None:
        progress.update(0, 1, "binarising codebook")
    cb = round_small_vectors(raw, tol)
    full = binarize_codebook(cb, tol, used_mask)
    pairs = pair_indices(cb.shape[0], used_mask)
    t1 = time.perf_counter()
    kept, table_before, tied = _shorten(full, used_mask, scope, nearest, progress)
    t2 = time.perf_counter()
    bits = np.ascontiguousarray(full[:, kept])
    del full
    members = np.arange(cb.shape[0]) if used_mask is None else np.flatnonzero(used_mask)
    table_after = _hamming_packed(_pack_rows(bits[members]))
    preserved = _neighbours_preserved(table_before, table_after, scope, nearest)
    eucl = _neighbour_order(cdist(cb[members], cb[members], metric="euclidean"))
    before, after = _neighbour_order(table_before), _neighbour_order(table_after)
    n = members.size
    zero = np.linalg.norm(raw, axis=1) < tol
    scored = _concordance_views(cb, bits, used_mask, zero, qs)
    report = BinarizationReport(
        num_codes=int(cb.shape[0]),
        num_used=int(n),
        code_dim=int(cb.shape[1]),
        zero_tol=tol,
        scope=scope,
        nearest=nearest,
        bits_before=int(pairs.shape[0]),
        bits_after=int(kept.size),
        tie_kept_bits=tied,
        compression_ratio=float(kept.size / pairs.shape[0]) if pairs.shape[0] else 0.0,
        compactness=float(zero.mean()),
        num_zero_vectors=int(zero.sum()),
        num_distinct_codes=_count_distinct(bits[members]),
        concordance_before={q: _mean_jaccard(eucl, before, q) for q in qs},
        concordance={q: _mean_jaccard(eucl, after, q) for q in qs},
        nearest_preserved=preserved,
        runtime_s=time.perf_counter() - t0,
        shorten_runtime_s=t2 - t1,
        codebook_sha256=_codebook_digest(raw),
        concordance_paper=scored["paper"],
        concordance_used=scored["used"],
    )
    if progress is not None:
        progress.update(1, 1, "binarising codebook")
    return BinaryCodes(bits=bits, kept_pairs=pairs[kept], report=report, used=used_mask)
