"""Token embedding lookup and the float lm_head over F16 / BF16 / F32 matrices.

Half-precision matrices stay in their file bytes, viewed as uint16 [V, D]; rows are widened to float32
in registers (F16: sign | (exp,mantissa) << 13, then * 2^112, which is exact for normal and subnormal
halves; BF16: bits << 16). The lm_head is weight-stationary: each vocabulary row is read from memory once per
step and applied to every requested hidden row; work is split over vocabulary rows, never over the D reduction.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ._bounds import in_range
from ._config import JIT, JIT_EXACT_PARALLEL, JIT_PARALLEL
from ._cpu import AVAILABLE, KERNEL, check_kernel, simd_family
from ._ir import I16, I32, Emit, const64
from .buffers import aligned_zeros

F32 = 0
F16 = 1
BF16 = 2
_F16_RESCALE = np.float32(2.0 ** 112)


@njit(**JIT)
def _widen_row(src, kind, dst):
    """dst float32 [D] <- row src (uint16 half/bf16 bits widened, or float32 copied)."""
    D = src.shape[0]
    if kind == F32:
        for d in range(D):
            dst[d] = src[d]
        return
    bits = dst.view(np.uint32)
    if kind == F16:
        for d in range(D):
            h = np.uint32(src[d])
            bits[d] = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))
        for d in range(D):
            dst[d] *= _F16_RESCALE
    else:
        for d in range(D):
            bits[d] = np.uint32(src[d]) << np.uint32(16)


def embed(tokens, table, kind, out):
    """out[t] = table[tokens[t]] widened; table uint16 [V, D] (F16/BF16 bits) or float32 [V, D];
    out float32/float64 [>= T, D]."""
    T = tokens.shape[0]
    if out.shape[0] < T or out.shape[1] != table.shape[1]:
        raise ValueError(f"embed: out {out.shape} too small for {T} tokens of width {table.shape[1]}")
    if not in_range(tokens, T, table.shape[0]):
        raise ValueError(f"embed: token id out of range [0, {table.shape[0]})")
    if kind == F32:
        _embed_f32(tokens, table, out)
    else:
        _embed_u16(tokens, table, kind, out)


@njit(**JIT)
def _embed_f32(tokens, table, out):
    for t in range(tokens.shape[0]):
        out[t, :] = table[tokens[t]]


@njit(**JIT)
def _embed_u16(tokens, table, kind, out):
    row = np.empty(table.shape[1], np.float32)
    for t in range(tokens.shape[0]):
        _widen_row(table[tokens[t]], kind, row)
        out[t, :] = row


VOCAB_TASK = 64     # vocabulary rows per parallel task of the AVX2 lm_head (64 F16 rows of 2560: 320 KB, in L2)
# bytes ahead that the one-token tile prefetches in each of its 8 vocabulary rows: past the tile's own 8 rows
# (40 KB of 2B4T F16 rows) into the next tile's, so each thread keeps more of its contiguous share of the table in
# flight than the hardware prefetchers start on their own. One token row, 2B4T F16 table, 2 threads, AMD EPYC
# Zen 4: 8 x 1 tiles 16.4-20.5 ms at 40-64 KB against 20.5-22.8 ms for 4 x 1 tiles 512 bytes ahead
# (``docs/performance-avx512.md``); 4 KB ahead was slower than none.
LM_PREFETCH = 49152


def lm_head_scratch(n_threads, D):
    """The lm_head's per-thread scratch: float32 [n_threads, 2 * D] (two widened rows per worker thread)."""
    return aligned_zeros((n_threads, 2 * D), np.float32)


def simd_table(table, kernel=None) -> bool:
    """Whether ``lm_head`` takes its SIMD tiles for this table (given rows with contiguous elements): a SIMD
    kernel family, rows a multiple of 8 wide with contiguous elements."""
    return (KERNEL if kernel is None else kernel) != "portable" and table.shape[1] % 8 == 0 \
        and table.strides[1] == table.itemsize


def lm_head(x, table, kind, scratch, out, kernel=None):
    """out[r, v] = x[r] . table[v] for r < R. x float32 [R, D] (rows with contiguous elements); table [V, D]
    (uint16 F16/BF16 bits or float32); scratch from ``lm_head_scratch``; out float32 [>= R, V].

    Each logit is one dot of D products with a fixed order of operations that depends on neither R nor the
    row's place in the batch nor the thread count, so a row's logits are bit-identical in any batch.

    - ``avx2`` (D a multiple of 8): 8 float32 lanes per (token row, vocabulary row) pair, each lane an FMA
      chain over d = lane, lane + 8, ...; then a fixed pairwise sum of the lanes. F16 rows widen with
      ``vcvtph2ps``. Tiles: 3 vocabulary x 4 token rows (12 accumulators in registers) and, for the last
      R % 4 rows and for decode of one stream, 8 vocabulary x 1 token row prefetching far ahead (memory bound:
      the F16 table is the largest single read of a decode step).
    - ``avx512``: the same lanes, chains and sums as ``avx2`` (the same bits) in tiles of 6 vocabulary x 4
      token rows: 24 accumulators, which need AVX-512's 32 vector registers (ymm16-31 through AVX-512VL). One
      thread, F16 2B4T table: 32 rows 225 against 237 ms, 8 rows 74 against 92 ms.
    - ``portable``: rows widened into ``scratch``, 2 vocabulary x 4 token-row register tiles vectorised by
      LLVM; a short last group repeats its last row (computed, not stored)."""
    R, D = x.shape
    V = table.shape[0]
    if table.shape[1] != D or out.shape[0] < R or out.shape[1] != V or x.dtype != np.float32 \
            or out.dtype != np.float32:
        raise ValueError(f"lm_head: x {x.shape} {x.dtype}, table {table.shape}, out {out.shape} {out.dtype} "
                         f"do not match")
    if table.dtype != (np.float32 if kind == F32 else np.uint16):
        raise TypeError(f"lm_head: table dtype {table.dtype} does not match kind {kind}")
    if R == 0:
        return
    kernel = check_kernel("lm_head", KERNEL if kernel is None else kernel)
    if simd_table(table, kernel) and x.strides[1] == 4:
        _lm_head_avx2(x, table, kind, out, simd_family(kernel) == "avx512")
    else:
        if scratch.shape[0] < numba.config.NUMBA_NUM_THREADS or scratch.shape[1] != 2 * D:
            raise ValueError(f"lm_head: scratch {scratch.shape} must be [>= {numba.config.NUMBA_NUM_THREADS}, "
                             f"{2 * D}]")
        _lm_head_portable(x, table, kind, scratch, out)


# ---- AVX2 / FMA / F16C kernel ----------------------------------------------------------------------------

_V8F32, _V8I16 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(I16, 8)


def _emit_lm_tile(e, context, sig, args, RV, C, prefetch, wkind):
    """IR: out[t0 + c, v0 + r] = x[t0 + c] . table[v0 + r] for r < RV, c < C (``wkind``: the table's element
    format, fixed at compile time). The loop over D takes 16 columns per pass (two 8-lane steps: half the
    pointer updates and branches per FMA) and a last 8 where D % 16 == 8; each lane's FMA chain is the same."""
    b = e.b
    table_t, x_t, out_t = sig.args[0], sig.args[1], sig.args[5]
    table, x, v0, t0, _, out = args
    tp, tstride, _ = e.data_address(context, table_t, table, v0)
    xp, xstride, xshape = e.data_address(context, x_t, x, t0)
    fma = e.declare("llvm.fma.v8f32", _V8F32, [_V8F32, _V8F32, _V8F32])
    zero = ir.Constant(_V8F32, None)
    acc = [[cgutils.alloca_once_value(b, zero) for _ in range(C)] for _ in range(RV)]
    D = xshape[1]
    D16 = b.mul(b.sdiv(D, const64(16)), const64(16))

    def step(d):
        """acc[r][c] += table[v0 + r, d:d + 8] * x[t0 + c, d:d + 8]"""
        wofs = b.mul(d, const64(4 if wkind == F32 else 2))
        xofs = b.mul(d, const64(4))
        if prefetch:
            for r in range(RV):
                e.prefetch_read(e.addr(tp, tstride, r, wofs, prefetch))
        w = []
        for r in range(RV):
            if wkind == F32:
                w.append(e.load(e.addr(tp, tstride, r, wofs), _V8F32))
                continue
            bits = e.load(e.addr(tp, tstride, r, wofs), _V8I16)
            if wkind == F16:        # exact widening, vcvtph2ps
                w.append(b.fpext(b.bitcast(bits, ir.VectorType(ir.HalfType(), 8)), _V8F32))
            else:                   # BF16: the top half of a float32
                wide = b.shl(b.zext(bits, ir.VectorType(I32, 8)), ir.Constant(ir.VectorType(I32, 8), [16] * 8))
                w.append(b.bitcast(wide, _V8F32))
        for c in range(C):
            xv = e.load(e.addr(xp, xstride, c, xofs), _V8F32)
            for r in range(RV):
                b.store(b.call(fma, [w[r], xv, b.load(acc[r][c])]), acc[r][c])

    with cgutils.for_range_slice(b, const64(0), D16, const64(16)) as (d, _):
        step(d)
        step(b.add(d, const64(8)))
    with cgutils.for_range_slice(b, D16, D, const64(8)) as (d, _):
        step(d)
    for r in range(RV):
        v = b.add(v0, const64(r))
        for c in range(C):
            a = b.load(acc[r][c])       # fixed pairwise order, plain IEEE adds: (l0+l4 + l2+l6) + (l1+l5 + l3+l7)
            s4 = b.fadd(b.shuffle_vector(a, a, ir.Constant(ir.VectorType(I32, 4), [0, 1, 2, 3])),
                        b.shuffle_vector(a, a, ir.Constant(ir.VectorType(I32, 4), [4, 5, 6, 7])))
            s2 = b.fadd(b.shuffle_vector(s4, s4, ir.Constant(ir.VectorType(I32, 2), [0, 1])),
                        b.shuffle_vector(s4, s4, ir.Constant(ir.VectorType(I32, 2), [2, 3])))
            total = b.fadd(b.extract_element(s2, ir.Constant(I32, 0)), b.extract_element(s2, ir.Constant(I32, 1)))
            ary = context.make_array(out_t)(context, b, out)
            ptr = cgutils.get_item_pointer(context, b, out_t, ary, [b.add(t0, const64(c)), v], wraparound=False)
            b.store(total, ptr)


def _lm_tile(RV, C, prefetch=0):
    """An intrinsic ``(table, x, v0, t0, kind, out)``: vocabulary rows [v0, v0 + RV) against token rows
    [t0, t0 + C) over the whole D (a multiple of 8)."""
    @intrinsic
    def tile(typingctx, table, x, v0, t0, kind, out):
        if not (isinstance(table, types.Array) and isinstance(x, types.Array) and isinstance(out, types.Array)
                and all(isinstance(i, types.Integer) for i in (v0, t0, kind))):
            return None
        if table.ndim != 2 or table.dtype not in (types.uint16, types.float32) or x.ndim != 2 \
                or x.dtype != types.float32 or out.ndim != 2 or out.dtype != types.float32:
            return None
        sig = types.void(table, x, types.intp, types.intp, types.intp, out)

        def codegen(context, builder, sig, args):
            e = Emit(builder)
            if sig.args[0].dtype == types.float32:
                _emit_lm_tile(e, context, sig, args, RV, C, prefetch, F32)
            else:
                is_bf16 = builder.icmp_signed("==", args[4], const64(BF16))
                with builder.if_else(is_bf16) as (bf16, f16):
                    with bf16:
                        _emit_lm_tile(e, context, sig, args, RV, C, prefetch, BF16)
                    with f16:
                        _emit_lm_tile(e, context, sig, args, RV, C, prefetch, F16)
            return context.get_dummy_value()
        return sig, codegen
    return tile


_t34, _t14, _t81, _t11 = _lm_tile(3, 4), _lm_tile(1, 4), _lm_tile(8, 1, LM_PREFETCH), _lm_tile(1, 1, LM_PREFETCH)
_t64 = _lm_tile(6, 4)
_t11_entry = _lm_tile(1, 1)     # single logits of scattered vocabulary rows: nothing ahead worth prefetching


@njit(**JIT_EXACT_PARALLEL)
def _lm_head_avx2(x, table, kind, out, wide):
    R = x.shape[0]
    V = table.shape[0]
    RV = 6 if wide else 3           # vocabulary rows per 4-token tile: 6 x 4 needs 31 of AVX-512's 32 registers
    for task in prange((V + VOCAB_TASK - 1) // VOCAB_TASK):
        v_lo = task * VOCAB_TASK
        v_hi = min(V, v_lo + VOCAB_TASK)
        t = 0
        while t + 4 <= R:           # the task's vocabulary rows stay in L2 while 4 token rows at a time pass
            v = v_lo
            while v + RV <= v_hi:
                if wide:
                    _t64(table, x, v, t, kind, out)
                else:
                    _t34(table, x, v, t, kind, out)
                v += RV
            while v < v_hi:
                _t14(table, x, v, t, kind, out)
                v += 1
            t += 4
        while t < R:
            v = v_lo
            while v + 8 <= v_hi:
                _t81(table, x, v, t, kind, out)
                v += 8
            while v < v_hi:
                _t11(table, x, v, t, kind, out)
                v += 1
            t += 1


def lm_head_entries(x, table, kind, rows, cols, out, dest=None, kernel=None):
    """out[rows[i], dest[i]] = x[rows[i]] . table[cols[i]] for every i (``dest`` defaults to ``cols``): single
    logits with the bits ``lm_head`` gives them on the SIMD families (its 1 x 1 tile: the same lane chains and lane
    sum), whether ``table`` is the whole lm_head table or a copy of some of its rows. x float32 [R, D] with D a
    multiple of 8; rows, cols, dest int64 [n]; out float32 [>= R, V]."""
    R, D = x.shape
    V = out.shape[1]
    dest = cols if dest is None else dest
    kernel = KERNEL if kernel is None else kernel
    if kernel not in AVAILABLE or kernel == "portable":
        raise ValueError(f"lm_head_entries: needs a SIMD kernel family on this CPU, got {kernel!r}")
    if table.shape[1] != D or not simd_table(table, kernel) or x.dtype != np.float32 or x.strides[1] != 4 \
            or out.dtype != np.float32 or out.shape[0] < R:
        raise ValueError(f"lm_head_entries: x {x.shape} {x.dtype}, table {table.shape}, out {out.shape} "
                         f"{out.dtype} do not match")
    if table.dtype != (np.float32 if kind == F32 else np.uint16):
        raise TypeError(f"lm_head_entries: table dtype {table.dtype} does not match kind {kind}")
    if not rows.shape == cols.shape == dest.shape or not rows.dtype == cols.dtype == dest.dtype == np.int64:
        raise ValueError("lm_head_entries: rows, cols and dest must be int64 arrays of one shape")
    n = rows.shape[0]
    if not (in_range(rows, n, R) and in_range(cols, n, table.shape[0]) and in_range(dest, n, V)):
        raise ValueError(f"lm_head_entries: an entry lies outside the rows ({R}), the table ({table.shape[0]}) or "
                         f"the logits ({V})")
    _lm_head_entries(x, table, kind, rows, cols, dest, out)


@njit(**JIT_EXACT_PARALLEL)
def _lm_head_entries(x, table, kind, rows, cols, dest, out):
    for i in prange(rows.shape[0]):
        _t11_entry(table[cols[i]:cols[i] + 1], x, 0, rows[i], kind, out[:, dest[i]:dest[i] + 1])


# ---- portable kernel -------------------------------------------------------------------------------------

@njit(**JIT)
def _dot_tile(x0, x1, x2, x3, w0, w1):
    """x0..x3 . w0 and x0..x3 . w1 (8 register accumulators)."""
    D = x0.shape[0]
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    for d in range(D):
        w, u = w0[d], w1[d]
        a0 += w * x0[d]
        a1 += w * x1[d]
        a2 += w * x2[d]
        a3 += w * x3[d]
        b0 += u * x0[d]
        b1 += u * x1[d]
        b2 += u * x2[d]
        b3 += u * x3[d]
    return a0, a1, a2, a3, b0, b1, b2, b3


@njit(**JIT_PARALLEL)
def _lm_head_portable(x, table, kind, scratch, out):
    R, D = x.shape
    V = table.shape[0]
    for vp in prange((V + 1) // 2):
        v0 = 2 * vp
        v1 = min(v0 + 1, V - 1)            # odd V: the last pair is (V-1, V-1)
        buf = scratch[numba.get_thread_id()]
        w0 = buf[:D]
        w1 = buf[D:]
        _widen_row(table[v0], kind, w0)
        _widen_row(table[v1], kind, w1)
        for r in range(0, R, 4):           # every row goes through the same 4-row code; a short last group
            n = min(4, R - r)              # repeats its last row
            a0, a1, a2, a3, b0, b1, b2, b3 = _dot_tile(x[r], x[r + min(1, n - 1)], x[r + min(2, n - 1)],
                                                       x[r + n - 1], w0, w1)
            out[r, v0] = a0
            out[r, v1] = b0
            if n > 1:
                out[r + 1, v0] = a1
                out[r + 1, v1] = b1
            if n > 2:
                out[r + 2, v0] = a2
                out[r + 2, v1] = b2
            if n > 3:
                out[r + 3, v0] = a3
                out[r + 3, v1] = b3
