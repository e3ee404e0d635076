"""numba kernel of the table-lookup scan (see ``fdn_core.codes.scan`` for the contract).

Imported only when numba is importable; ``scan.py`` falls back to torch otherwise. Compiled with
``cache=True`` (numba writes the machine code next to this file, or to its user-wide cache when this
folder is read-only), so only the very first call on a machine compiles (seconds); later processes load it.

One kernel serves every search: ``tasks`` (ranges of whole volumes inside one code segment) are shared out
dynamically among numba's threads; each task walks its rows in tiles of ``TILE`` rows, sums the query's
lookup tables over the positions of both code types in the same pass, turns the sums into the mode's
distance and reduces it at once (every distance, each volume's best slice, or each task's ``top`` slices)
so the (rows x queries) distance matrix is never written out for volume- or slice-wise searches.

Two inner loops:

- one query (``lanes == 1``): scalar float32 sums, four rows interleaved so that four independent addition
  chains keep the load units busy;
- a batch (``lanes`` a multiple of 16): the lookup table holds, for each (position, code), the entries of
  all queries side by side, and a row adds 16 queries at a time with one vector load and one vector add
  (an LLVM ``<16 x float>`` value, kept in registers through the position loop: see ``_F32x16``).

Both add the positions of a row one after the other in float32 and apply the same operations afterwards,
so a query gets bit-identical distances alone or in a batch.

A third kernel, ``bound_kernel``, serves single volume-wise queries with Hamming or Euclidean distances: it
sums uint8 tables (the float32 entries floored onto 256 levels: 32 KiB per code type at K = 512 instead of
128 KiB, so they stay in L1) into a lower bound of each volume's best distance; ``scan.py`` then scans
exactly, with ``scan_kernel``, only the volumes whose bound can still reach the top.

Code segments are passed as raw addresses (``addrs``, one per code type and segment) turned back into
arrays inside the kernel (``_codes_view``), so any number of memory-mapped segments is scanned in one call
without copying them and without one compilation per segment count. The caller keeps the arrays alive.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

__all__ = ["TILE", "bound_kernel", "scan_kernel", "sum_codes"]

#: Rows per tile: distances of a tile (TILE x lanes float32) stay in L1/L2 between compute and reduction.
TILE = 256
#: How far ahead (rows) the code rows are prefetched.
PREFETCH_ROWS = 32

_VEC = ir.VectorType(ir.FloatType(), 16)


class _F32x16Type(types.Type):  # type: ignore[misc]
    """Sixteen float32 lanes held in one LLVM vector value (a zmm register, or 2 ymm / 4 NEON registers)."""

    def __init__(self) -> None:
        super().__init__(name="fdn_f32x16")


_f32x16 = _F32x16Type()


@register_model(_F32x16Type)
class _F32x16Model(models.PrimitiveModel):  # type: ignore[misc]
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, _VEC)


def _vector_pointer(context: Any, builder: Any, array_type: Any, array: Any, index: Any) -> Any:
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), ir.PointerType(_VEC))


@intrinsic  # type: ignore[untyped-decorator]
def _vzero(typingctx: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return ir.Constant(_VEC, None)

    return _f32x16(), codegen


@intrinsic  # type: ignore[untyped-decorator]
def _vsplat(typingctx: Any, value: Any) -> Any:
    """All 16 lanes equal to a float32 scalar."""
    if value != types.float32:
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        vec = builder.insert_element(ir.Constant(_VEC, None), args[0], ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(
            vec, ir.Constant(_VEC, None), ir.Constant(ir.VectorType(ir.IntType(32), 16), None)
        )

    return _f32x16(types.float32), codegen


@intrinsic  # type: ignore[untyped-decorator]
def _vload(typingctx: Any, array: Any, index: Any) -> Any:
    """``array[index : index + 16]`` of a C-contiguous 1-D float32 array (no bounds check)."""
    if not (isinstance(array, types.Array) and array.dtype == types.float32 and array.ndim == 1):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.load(_vector_pointer(context, builder, sig.args[0], args[0], args[1]), align=4)

    return _f32x16(array, types.intp), codegen


@intrinsic  # type: ignore[untyped-decorator]
def _vstore(typingctx: Any, array: Any, index: Any, value: Any) -> Any:
    """``array[index : index + 16] = value`` (no bounds check)."""
    if not (isinstance(array, types.Array) and array.dtype == types.float32 and array.ndim == 1):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        builder.store(args[2], _vector_pointer(context, builder, sig.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()

    return types.none(array, types.intp, _f32x16), codegen


def _binary(op: str) -> Any:
    @intrinsic  # type: ignore[untyped-decorator]
    def vop(typingctx: Any, a: Any, b: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return getattr(builder, op)(args[0], args[1])

        return _f32x16(_f32x16, _f32x16), codegen

    return vop


_vadd = _binary("fadd")
_vsub = _binary("fsub")
_vmul = _binary("fmul")


@intrinsic  # type: ignore[untyped-decorator]
def _vsqrt0(typingctx: Any, a: Any) -> Any:
    """``sqrt(max(a, 0))`` lane by lane (IEEE, correctly rounded: equal to the scalar ``np.sqrt``)."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        maxnum = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC, _VEC]), "llvm.maxnum.v16f32"
        )
        sqrt = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC]), "llvm.sqrt.v16f32"
        )
        return builder.call(sqrt, [builder.call(maxnum, [args[0], ir.Constant(_VEC, None)])])

    return _f32x16(_f32x16), codegen


@intrinsic  # type: ignore[untyped-decorator]
def _pointer(typingctx: Any, address: Any, proto: Any) -> Any:
    """The integer ``address`` as a pointer to ``proto``'s element type."""
    if not (isinstance(address, types.Integer) and isinstance(proto, types.Array)):
        return None
    sig = types.CPointer(proto.dtype)(address, proto)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic  # type: ignore[untyped-decorator]
def _prefetch(typingctx: Any, array: Any, index: Any) -> Any:
    """Hint the cache to fetch the line holding element ``index`` of a C-contiguous array (flat index)."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        )
        ptr = builder.bitcast(builder.gep(data, [args[1]]), i8p)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])  # read, keep
        return context.get_dummy_value()

    return types.none(array, types.intp), codegen


@njit(inline="always")  # type: ignore[untyped-decorator]
def _prefetch_rows(codes: np.ndarray, r: int, rows: int) -> None:
    """Prefetch rows r..r+rows-1 of a (N, P) code array (when they exist). The hardware prefetcher alone
    falls behind when two code arrays are streamed at once, and it stops at every 4 KiB page of a memory
    map; asking PREFETCH_ROWS rows ahead keeps the scan compute-bound."""
    if r + rows <= codes.shape[0]:
        step = max(1, 64 // codes.itemsize)
        start = r * codes.shape[1]
        for off in range(0, rows * codes.shape[1], step):
            _prefetch(codes, start + off)


@njit(inline="always")  # type: ignore[untyped-decorator]
def _codes_view(address: int, rows: int, positions: int, proto: np.ndarray) -> np.ndarray:
    """The (rows, positions) C-contiguous code array starting at ``address`` (dtype of ``proto``)."""
    return carray(_pointer(address, proto), (rows, positions))


@njit(inline="always")  # type: ignore[untyped-decorator]
def _task(
    tasks: np.ndarray,
    task: int,
    addrs: np.ndarray,
    seg_rows: np.ndarray,
    positions: int,
    proto: np.ndarray,
    n_types: int,
) -> tuple[int, int, int, int, np.ndarray, np.ndarray]:
    """One task's first and stop rows, first volume, first row within its segment, and the segment's code
    arrays of the first and last code type scanned."""
    seg = tasks[task, 0]
    c0 = _codes_view(addrs[0, seg], seg_rows[seg], positions, proto)
    c1 = _codes_view(addrs[n_types - 1, seg], seg_rows[seg], positions, proto)
    return tasks[task, 1], tasks[task, 2], tasks[task, 3], tasks[task, 4], c0, c1


@njit(inline="always")  # type: ignore[untyped-decorator]
def _term(s: np.float32, kind: int, inv_q: np.float32, inv_r: np.float32) -> np.float32:
    """One code type's distance from its table sum: 0 Hamming (the sum), 1 Euclidean (its square root),
    2 angular (1 - cosine, the sum being the dot product)."""
    if kind == 1:
        return np.sqrt(s if s > np.float32(0.0) else np.float32(0.0))
    if kind == 2:
        return np.float32(1.0) - (s * inv_r) * inv_q
    return s


@njit(inline="always")  # type: ignore[untyped-decorator]
def _vterm(s: Any, kind: int, inv_q: Any, inv_r: np.float32) -> Any:
    """``_term`` on 16 lanes (``inv_q`` holds the 16 queries' inverse norms)."""
    if kind == 1:
        return _vsqrt0(s)
    if kind == 2:
        return _vsub(_vsplat(np.float32(1.0)), _vmul(_vmul(s, _vsplat(inv_r)), inv_q))
    return s


@njit(inline="always")  # type: ignore[untyped-decorator]
def _sums4(codes: np.ndarray, lut: np.ndarray, r: int, k: int) -> tuple[Any, Any, Any, Any]:
    """Table sums of rows r..r+3, positions added in order (four independent addition chains)."""
    zero = np.float32(0.0)
    s0 = zero
    s1 = zero
    s2 = zero
    s3 = zero
    for j in range(codes.shape[1]):
        base = np.uint64(j * k)  # unsigned indices: no negative-index wrap-around code per lookup
        s0 += lut[base + np.uint64(codes[r, j])]
        s1 += lut[base + np.uint64(codes[r + 1, j])]
        s2 += lut[base + np.uint64(codes[r + 2, j])]
        s3 += lut[base + np.uint64(codes[r + 3, j])]
    return s0, s1, s2, s3


@njit(inline="always")  # type: ignore[untyped-decorator]
def _sum1(codes: np.ndarray, lut: np.ndarray, r: int, k: int) -> Any:
    """Table sum of row r, positions added in order."""
    s0 = np.float32(0.0)
    for j in range(codes.shape[1]):
        s0 += lut[np.uint64(j * k) + np.uint64(codes[r, j])]
    return s0


@njit(cache=True, nogil=True)  # type: ignore[untyped-decorator]
def _scalar_tile(
    c0: np.ndarray,
    c1: np.ndarray,
    local: int,
    m: int,
    row0: int,
    n_types: int,
    luts: np.ndarray,
    k: int,
    kind: int,
    inv_q: np.ndarray,
    inv_r: np.ndarray,
    weight: np.ndarray,
    dist: np.ndarray,
) -> None:
    """One query: ``dist[i]`` for the ``m`` rows starting at segment row ``local`` (global row ``row0``):
    ``0 + weight[0] * term_0 (+ weight[1] * term_1)``, rows four at a time."""
    lut0 = luts[0]
    lut1 = luts[n_types - 1]
    w0 = weight[0]
    w1 = weight[n_types - 1]
    q0 = inv_q[0, 0]
    q1 = inv_q[n_types - 1, 0]
    zero = np.float32(0.0)
    angular = kind == 2
    i = 0
    while i + 4 <= m:
        r = local + i
        g = row0 + i
        _prefetch_rows(c0, r + PREFETCH_ROWS, 4)
        if n_types == 2:
            _prefetch_rows(c1, r + PREFETCH_ROWS, 4)
        a0, a1, a2, a3 = _sums4(c0, lut0, r, k)
        d0 = zero + _term(a0, kind, q0, inv_r[0, g] if angular else zero) * w0
        d1 = zero + _term(a1, kind, q0, inv_r[0, g + 1] if angular else zero) * w0
        d2 = zero + _term(a2, kind, q0, inv_r[0, g + 2] if angular else zero) * w0
        d3 = zero + _term(a3, kind, q0, inv_r[0, g + 3] if angular else zero) * w0
        if n_types == 2:
            b0, b1, b2, b3 = _sums4(c1, lut1, r, k)
            d0 += _term(b0, kind, q1, inv_r[1, g] if angular else zero) * w1
            d1 += _term(b1, kind, q1, inv_r[1, g + 1] if angular else zero) * w1
            d2 += _term(b2, kind, q1, inv_r[1, g + 2] if angular else zero) * w1
            d3 += _term(b3, kind, q1, inv_r[1, g + 3] if angular else zero) * w1
        dist[i] = d0
        dist[i + 1] = d1
        dist[i + 2] = d2
        dist[i + 3] = d3
        i += 4
    while i < m:
        r = local + i
        g = row0 + i
        d0 = zero + _term(_sum1(c0, lut0, r, k), kind, q0, inv_r[0, g] if angular else zero) * w0
        if n_types == 2:
            d0 += _term(_sum1(c1, lut1, r, k), kind, q1, inv_r[1, g] if angular else zero) * w1
        dist[i] = d0
        i += 1


@njit(inline="always")  # type: ignore[untyped-decorator]
def _vsums(
    codes: np.ndarray, lut: np.ndarray, r: int, k: int, lanes: int, off: int, pair: bool
) -> tuple[Any, Any]:
    """Table sums of row r for lanes off..off+15 (and off+16..off+31 when ``pair``), positions in order."""
    a0 = _vzero()
    a1 = _vzero()
    if pair:
        for j in range(codes.shape[1]):
            base = (j * k + np.intp(codes[r, j])) * lanes + off
            a0 = _vadd(a0, _vload(lut, base))
            a1 = _vadd(a1, _vload(lut, base + 16))
    else:
        for j in range(codes.shape[1]):
            a0 = _vadd(a0, _vload(lut, (j * k + np.intp(codes[r, j])) * lanes + off))
    return a0, a1


# _vector_tile repeats _scalar_tile's parameters and term arithmetic on purpose: each is its own compiled
# kernel specialised for its loop (one query, rows four at a time / 16-lane query groups); one kernel with a
# lanes branch, or the terms behind a shared helper taking either layout, costs the hot loop speed.
@njit(cache=True, nogil=True)  # type: ignore[untyped-decorator]
def _vector_tile(
    c0: np.ndarray,
    c1: np.ndarray,
    local: int,
    m: int,
    row0: int,
    n_types: int,
    luts: np.ndarray,
    k: int,
    lanes: int,
    kind: int,
    inv_q: np.ndarray,
    inv_r: np.ndarray,
    weight: np.ndarray,
    dist: np.ndarray,
) -> None:
    """A batch: ``dist[i * lanes + b]`` for the ``m`` rows starting at segment row ``local``; 16 queries
    (one group of lanes) at a time, two groups per pass over a row's codes when there are two."""
    groups = lanes // 16
    lut0 = luts[0]
    lut1 = luts[n_types - 1]
    q0 = inv_q[0]
    q1 = inv_q[n_types - 1]
    w0 = _vsplat(weight[0])
    w1 = _vsplat(weight[n_types - 1])
    for i in range(m):
        r = local + i
        _prefetch_rows(c0, r + PREFETCH_ROWS, 1)
        if n_types == 2:
            _prefetch_rows(c1, r + PREFETCH_ROWS, 1)
        ir0 = inv_r[0, row0 + i] if kind == 2 else np.float32(0.0)
        ir1 = inv_r[n_types - 1, row0 + i] if kind == 2 else np.float32(0.0)
        g = 0
        while g < groups:
            pair = g + 1 < groups
            off = g * 16
            a0, a1 = _vsums(c0, lut0, r, k, lanes, off, pair)
            tot0 = _vadd(_vzero(), _vmul(_vterm(a0, kind, _vload(q0, off), ir0), w0))
            tot1 = _vadd(_vzero(), _vmul(_vterm(a1, kind, _vload(q0, off + 16), ir0), w0)) if pair else a1
            if n_types == 2:
                b0, b1 = _vsums(c1, lut1, r, k, lanes, off, pair)
                tot0 = _vadd(tot0, _vmul(_vterm(b0, kind, _vload(q1, off), ir1), w1))
                if pair:
                    tot1 = _vadd(tot1, _vmul(_vterm(b1, kind, _vload(q1, off + 16), ir1), w1))
            _vstore(dist, i * lanes + off, tot0)
            if pair:
                _vstore(dist, i * lanes + off + 16, tot1)
            g += 2 if pair else 1


@njit(parallel=True, cache=True, nogil=True)  # type: ignore[untyped-decorator]
def scan_kernel(
    addrs: np.ndarray,
    seg_rows: np.ndarray,
    proto: np.ndarray,
    positions: int,
    tasks: np.ndarray,
    vol_stop: np.ndarray,
    luts: np.ndarray,
    k: int,
    lanes: int,
    n_queries: int,
    kind: int,
    inv_q: np.ndarray,
    inv_r: np.ndarray,
    weight: np.ndarray,
    excluded: np.ndarray,
    select: int,
    out_val: np.ndarray,
    out_row: np.ndarray,
) -> None:
    """Scan ``tasks`` and reduce their distances into ``out_val`` / ``out_row``.

    addrs (T, S) int64 code-array addresses per code type and segment; seg_rows (S,) rows per segment;
    proto: an empty array of the code dtype; tasks (M, 5) int64 (segment, first global row, stop global
    row, first volume, first row within the segment); vol_stop (V,) global stop row of each volume; luts
    (T, P*K*lanes) float32 with entry ``[(j*K + code)*lanes + b]``; inv_q (T, lanes) float32; inv_r
    (T, N) float32 (angular) or (T, 0); weight (T,) float32; excluded (E, 3) int64 (first row, stop row,
    query) set to +inf.
    select 0: out_val (N, B, 1) every distance; 1: out_val / out_row (V, B, 1) each volume's best
    distance and row (first row among equals); 2: out_val / out_row (M, B, top) each task's ``top``
    smallest (distance, row) in order, +inf / -1 padded. (Always 3-D: one compiled signature per code
    dtype.)
    """
    n_types = luts.shape[0]
    n_tasks = tasks.shape[0]
    top = out_val.shape[2]
    for task in prange(n_tasks):
        first, stop, v, seg_first, c0, c1 = _task(tasks, task, addrs, seg_rows, positions, proto, n_types)
        dist = np.empty(TILE * lanes, np.float32)
        for row0 in range(first, stop, TILE):
            m = min(TILE, stop - row0)
            local = seg_first + (row0 - first)
            if lanes == 1:
                _scalar_tile(c0, c1, local, m, row0, n_types, luts, k, kind, inv_q, inv_r, weight, dist)
            else:
                _vector_tile(
                    c0, c1, local, m, row0, n_types, luts, k, lanes, kind, inv_q, inv_r, weight, dist
                )
            for e in range(excluded.shape[0]):
                lo = max(excluded[e, 0], row0)
                hi = min(excluded[e, 1], row0 + m)
                b = excluded[e, 2]
                for r in range(lo, hi):
                    dist[(r - row0) * lanes + b] = np.inf
            if select == 0:
                for i in range(m):
                    for b in range(n_queries):
                        out_val[row0 + i, b, 0] = dist[i * lanes + b]
            elif select == 1:
                for i in range(m):
                    r = row0 + i
                    while r >= vol_stop[v]:
                        v += 1
                    for b in range(n_queries):
                        d = dist[i * lanes + b]
                        if d < out_val[v, b, 0]:
                            out_val[v, b, 0] = d
                            out_row[v, b, 0] = r
            else:
                for i in range(m):
                    for b in range(n_queries):
                        d = dist[i * lanes + b]
                        if d < out_val[task, b, top - 1]:
                            pos = top - 1
                            while pos > 0 and out_val[task, b, pos - 1] > d:
                                out_val[task, b, pos] = out_val[task, b, pos - 1]
                                out_row[task, b, pos] = out_row[task, b, pos - 1]
                                pos -= 1
                            out_val[task, b, pos] = d
                            out_row[task, b, pos] = row0 + i


@njit(inline="always")  # type: ignore[untyped-decorator]
def _qsums4(codes: np.ndarray, qlut: np.ndarray, r: int, k: int) -> tuple[Any, Any, Any, Any]:
    """Integer sums of a uint8 table over rows r..r+3 (four independent addition chains)."""
    s0 = np.uint32(0)
    s1 = np.uint32(0)
    s2 = np.uint32(0)
    s3 = np.uint32(0)
    for j in range(codes.shape[1]):
        base = np.uint64(j * k)
        s0 += np.uint32(qlut[base + np.uint64(codes[r, j])])
        s1 += np.uint32(qlut[base + np.uint64(codes[r + 1, j])])
        s2 += np.uint32(qlut[base + np.uint64(codes[r + 2, j])])
        s3 += np.uint32(qlut[base + np.uint64(codes[r + 3, j])])
    return s0, s1, s2, s3


@njit(inline="always")  # type: ignore[untyped-decorator]
def _qsum1(codes: np.ndarray, qlut: np.ndarray, r: int, k: int) -> Any:
    """Integer sum of a uint8 table over row r."""
    s0 = np.uint32(0)
    for j in range(codes.shape[1]):
        s0 += np.uint32(qlut[np.uint64(j * k) + np.uint64(codes[r, j])])
    return s0


@njit(parallel=True, cache=True, nogil=True)  # type: ignore[untyped-decorator]
def bound_kernel(
    addrs: np.ndarray,
    seg_rows: np.ndarray,
    proto: np.ndarray,
    positions: int,
    tasks: np.ndarray,
    vol_stop: np.ndarray,
    qluts: np.ndarray,
    k: int,
    terms: np.ndarray,
    excluded: np.ndarray,
    out_val: np.ndarray,
) -> None:
    """Each volume's smallest lower bound of one query's distance into ``out_val`` (V,) float64 (+inf when
    every row is excluded). qluts (T, P*K) uint8 with entry ``[j*K + code]``; terms (T, 255*P + 1) float64:
    a lower bound of code type t's weighted term for each integer table sum; other arguments as in
    ``scan_kernel``."""
    n_types = qluts.shape[0]
    for task in prange(tasks.shape[0]):
        first, stop, v, seg_first, c0, c1 = _task(tasks, task, addrs, seg_rows, positions, proto, n_types)
        lut0 = qluts[0]
        lut1 = qluts[n_types - 1]
        # one code type: the bound grows with the integer sum, so each volume keeps its smallest sum
        # and converts it once; two: each row's bound is the sum of both terms
        qbest = np.uint32(0xFFFFFFFF)
        best = np.inf
        r = first
        while r < stop:
            local = seg_first + (r - first)
            if r + 4 <= vol_stop[v]:  # four rows at a time while they stay inside the volume, else one
                _prefetch_rows(c0, local + PREFETCH_ROWS, 4)
                a0, a1, a2, a3 = _qsums4(c0, lut0, local, k)
                if n_types == 1:
                    qbest = min(qbest, min(min(a0, a1), min(a2, a3)))
                else:
                    _prefetch_rows(c1, local + PREFETCH_ROWS, 4)
                    b0, b1, b2, b3 = _qsums4(c1, lut1, local, k)
                    m0 = min(terms[0, a0] + terms[1, b0], terms[0, a1] + terms[1, b1])
                    m1 = min(terms[0, a2] + terms[1, b2], terms[0, a3] + terms[1, b3])
                    best = min(best, min(m0, m1))
                r += 4
            else:
                a0 = _qsum1(c0, lut0, local, k)
                if n_types == 1:
                    qbest = min(qbest, a0)
                else:
                    best = min(best, terms[0, a0] + terms[1, _qsum1(c1, lut1, local, k)])
                r += 1
            if r >= vol_stop[v]:
                if n_types == 1:
                    best = terms[0, qbest]
                vstart = vol_stop[v - 1] if v > 0 else 0
                for e in range(excluded.shape[0]):  # whole volumes (checked by the caller)
                    if excluded[e, 0] < vol_stop[v] and vstart < excluded[e, 1]:
                        best = np.inf
                out_val[v] = best
                best = np.inf
                qbest = np.uint32(0xFFFFFFFF)
                v += 1


@njit(parallel=True, cache=True, nogil=True)  # type: ignore[untyped-decorator]
def sum_codes(addrs: np.ndarray, seg_rows: np.ndarray, proto: np.ndarray, positions: int) -> int:
    """Sum of every code of every segment of one code type: reads the codes once, as fast as memory
    allows (the benchmark's memory-read floor for the scan)."""
    total = 0
    for s in range(seg_rows.shape[0]):
        codes = _codes_view(addrs[0, s], seg_rows[s], positions, proto)
        n = seg_rows[s]
        for r in prange(n):
            acc = 0
            for j in range(positions):
                acc += int(codes[r, j])
            total += acc
    return total
