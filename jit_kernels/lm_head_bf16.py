"""The opt-in bf16 lm_head: logits from bfloat16-rounded rows and table with float32 sums, in the order of AVX-512
BF16's ``vdpbf16ps``, which does twice the multiply-adds per cycle of a float32 FMA.

The spec's lm_head (``embedding.lm_head``) multiplies float32 rows by the F16 table widened exactly. This one
rounds both to bfloat16 first (round to nearest even: the table once, when the engine is built; the rows each
step) and is an opt-in numerics choice, like a float16 KV cache: each product's operands move by up to 2^-9
relative (on the reference models and the shipped model: logits by up to 0.02-0.05 of a range of 24-36, the same
top token at every position).

Order of operations, the same on every path, so a row's logits are bit-identical whatever the path, the batch
and the thread count: D is padded with zeros to a multiple of 32; lane l (0..15) of 16 float32 accumulators
takes, for each 32-element chunk k, ``acc[l] += x[32k+2l+1] * w[32k+2l+1]`` then ``acc[l] += x[32k+2l] *
w[32k+2l]``, each rounded once (a product of two bfloat16 is exact in float32); the lanes are summed pairwise,
``((l + (l+8)) + ((l+4) + (l+12))) ...``: l[i] + l[i+8], then [i] + [i+4], [i] + [i+2], [0] + [1]. That is what
``vdpbf16ps`` computes (odd product first; checked against it bit for bit on AMD Zen 4, as Intel documents it),
with one difference: it treats subnormal inputs and results as zero, which bfloat16-rounded logits rows and
tables never hold in practice.

Paths: LLVM-IR tiles (``_lm_head_tiles``, the task split of ``embedding``'s lm_head). The ``avx512`` family on a
CPU with AVX512_BF16 (AMD Zen 4 and later, Intel Cooper Lake / Sapphire Rapids and later) calls
``llvm.x86.avx512bf16.dpbf16ps.512``: 6 vocabulary x 4 token rows (24 zmm accumulators), 8 x 1 for the last rows
and one-stream decode; 2B4T table, 2 threads, Zen 4: 32 rows 66 ms against 110 for the float32 lm_head. The
other SIMD families widen the odd and even elements and do the two FMAs (the same bits; 32 rows 115 ms, no
faster than float32: the option pays only where the instruction exists). ``portable``: plain loops, same bits.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ._config import JIT_EXACT, JIT_EXACT_PARALLEL, JIT_PARALLEL
from ._cpu import HAS_AVX512_BF16, KERNEL, check_kernel, simd_family
from ._ir import I16, I32, Emit, const64
from .embedding import BF16, F16, F32, LM_PREFETCH, VOCAB_TASK, _widen_row

CHUNK = 32           # bfloat16 elements per vdpbf16ps operand (16 lanes x 2)
LANES = 16


def padded_dim(D: int) -> int:
    """D rounded up to a multiple of CHUNK: the width of the bf16 table and rows (zero padded)."""
    return -(-D // CHUNK) * CHUNK


def has_fast_path(kernel=None) -> bool:
    """Whether ``lm_head_bf16`` takes the ``vdpbf16ps`` tiles here (the ``avx512`` family on an AVX512_BF16
    CPU); elsewhere it gives the same bits from FMA tiles (SIMD families) or plain loops (``portable``)."""
    return simd_family(KERNEL if kernel is None else kernel) == "avx512" and HAS_AVX512_BF16


def scratch(n_threads: int, D: int) -> np.ndarray:
    """Per-thread scratch of the plain path: float32 [n_threads, padded_dim(D) + LANES] (a widened table row and
    the 16 lane sums)."""
    return np.zeros((n_threads, padded_dim(D) + LANES), np.float32)


# ---- rounding --------------------------------------------------------------------------------------------

@njit(**JIT_EXACT)
def _round_row(src, bits):
    """bits[d] <- bfloat16 bits of float32 src[d] (round to nearest even; NaN stays a quiet NaN), d < len(src)."""
    u = src.view(np.uint32)
    for d in range(src.shape[0]):
        v = u[d]
        if (v & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            bits[d] = np.uint16((v >> np.uint32(16)) | np.uint32(0x40))
        else:
            bits[d] = np.uint16((v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(**JIT_EXACT)
def _widen_bf16(bits, dst):
    """dst[d] <- the float32 value of bfloat16 bits[d] (exact)."""
    u = dst.view(np.uint32)
    for d in range(bits.shape[0]):
        u[d] = np.uint32(bits[d]) << np.uint32(16)


def round_rows(x, xb, xr):
    """xb[t] <- x[t] rounded to bfloat16 (uint16 bits) and xr[t] <- the same values as float32, for t < R; columns
    D.. of both are zero. x float32 [R, D]; xb uint16 [>= R, padded_dim(D)]; xr float32 like xb."""
    R, D = x.shape
    Dp = padded_dim(D)
    if x.dtype != np.float32 or xb.dtype != np.uint16 or xr.dtype != np.float32 or xb.shape[0] < R \
            or xb.shape[1] != Dp or xr.shape[0] < R or xr.shape[1] != Dp or not x.flags.c_contiguous \
            or not xb.flags.c_contiguous or not xr.flags.c_contiguous:
        raise ValueError(f"round_rows: x {x.shape} {x.dtype}, xb {xb.shape} {xb.dtype}, xr {xr.shape} {xr.dtype} "
                         f"do not match (padded width {Dp})")
    _round_rows(x, xb, xr)


@njit(**JIT_EXACT)
def _round_rows(x, xb, xr):
    R, D = x.shape
    for t in range(R):
        _round_row(x[t], xb[t])
        xb[t, D:] = 0
        _widen_bf16(xb[t], xr[t])


def bf16_table(table, kind, out):
    """out [V, padded_dim(D)] uint16 <- table [V, D] (F16 / BF16 bits as uint16, or float32; ``kind`` from
    ``embedding``) rounded to bfloat16, zero padded. Run once per model."""
    V, D = table.shape
    if out.shape != (V, padded_dim(D)) or out.dtype != np.uint16 or not out.flags.c_contiguous:
        raise ValueError(f"bf16_table: out {out.shape} {out.dtype} must be C-contiguous uint16 "
                         f"{(V, padded_dim(D))}")
    if table.dtype != (np.float32 if kind == F32 else np.uint16) or kind not in (F32, F16, BF16):
        raise TypeError(f"bf16_table: table dtype {table.dtype} does not match kind {kind}")
    _bf16_table(table, kind, out)


@njit(**JIT_EXACT_PARALLEL)
def _bf16_table(table, kind, out):
    V, D = table.shape
    for task in prange((V + VOCAB_TASK - 1) // VOCAB_TASK):
        row = np.empty(D, np.float32)
        for v in range(task * VOCAB_TASK, min(V, (task + 1) * VOCAB_TASK)):
            if kind == BF16:
                out[v, :D] = table[v]
            else:
                _widen_row(table[v], kind, row)
                _round_row(row, out[v])
            out[v, D:] = 0


# ---- lm_head ---------------------------------------------------------------------------------------------

def lm_head_bf16(xb, xr, table, scratch_, out, kernel=None):
    """out[r, v] = the bf16 dot of row r and table row v (module docstring), r < R = len(xb). xb / xr: the rows
    from ``round_rows`` (uint16 bits and float32 values, [R, Dp]); table: ``bf16_table``'s uint16 [V, Dp];
    scratch_ from ``scratch``; out float32 [>= R, V]."""
    R, Dp = xb.shape
    V = table.shape[0]
    if Dp % CHUNK or table.shape[1] != Dp or xr.shape != xb.shape or out.shape[0] < R or out.shape[1] != V \
            or xb.dtype != np.uint16 or table.dtype != np.uint16 or xr.dtype != np.float32 \
            or out.dtype != np.float32 or not (xb.flags.c_contiguous and xr.flags.c_contiguous
                                               and table.flags.c_contiguous):
        raise ValueError(f"lm_head_bf16: xb {xb.shape} {xb.dtype}, xr {xr.shape}, table {table.shape} "
                         f"{table.dtype}, out {out.shape} {out.dtype} do not match")
    kernel = check_kernel("lm_head_bf16", KERNEL if kernel is None else kernel)
    if R == 0:
        return
    if kernel != "portable":
        _lm_head_tiles(xb, table, out, has_fast_path(kernel))
        return
    if scratch_.shape[0] < numba.config.NUMBA_NUM_THREADS or scratch_.shape[1] < Dp + LANES \
            or scratch_.dtype != np.float32:
        raise ValueError(f"lm_head_bf16: scratch {scratch_.shape} must be float32 [>= "
                         f"{numba.config.NUMBA_NUM_THREADS}, >= {Dp + LANES}]")
    _lm_head_plain(xr, table, scratch_, out)


@njit(**JIT_EXACT)
def _dot_lanes(x, w, acc):
    """The 16 lane sums of x . w (float32 [Dp]) into acc, then their pairwise total."""
    acc[:] = 0
    for k in range(0, x.shape[0], CHUNK):
        for lane in range(LANES):
            d = k + 2 * lane
            a = acc[lane] + x[d + 1] * w[d + 1]
            acc[lane] = a + x[d] * w[d]
    for half in (8, 4, 2, 1):
        for lane in range(half):
            acc[lane] = acc[lane] + acc[lane + half]
    return acc[0]


@njit(**JIT_EXACT_PARALLEL)
def _lm_head_plain(xr, table, scratch_, out):
    R, Dp = xr.shape
    V = table.shape[0]
    for task in prange((V + VOCAB_TASK - 1) // VOCAB_TASK):
        buf = scratch_[numba.get_thread_id()]
        w, acc = buf[:Dp], buf[Dp:Dp + LANES]
        for v in range(task * VOCAB_TASK, min(V, (task + 1) * VOCAB_TASK)):
            _widen_bf16(table[v], w)
            for t in range(R):
                out[t, v] = _dot_lanes(xr[t], w, acc)


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no type for it; the intrinsic's operands are ``<32 x bfloat>``)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


_V16F32, _V16I32, _V32I16 = ir.VectorType(ir.FloatType(), LANES), ir.VectorType(I32, LANES), ir.VectorType(I16, CHUNK)
_V32BF16 = ir.VectorType(_BFloat(), CHUNK)


def _emit_tile(e, context, sig, args, RV, C, prefetch, native):
    """IR: out[t0 + c, v0 + r] for r < RV, c < C, 16 float32 lanes per (r, c) and 32-element chunk: ``native``,
    one ``vdpbf16ps``; else the odd and the even elements widened (zero-extend, shift by 16) and two FMAs in that
    order (a product of two bfloat16 is exact, so an FMA rounds as vdpbf16ps's add does). Then the fixed pairwise
    lane sum."""
    b = e.b
    table_t, x_t, out_t = sig.args[0], sig.args[1], sig.args[4]
    table, x, v0, t0, out = args
    tp, tstride, _ = e.data_address(context, table_t, table, v0)
    xp, xstride, xshape = e.data_address(context, x_t, x, t0)
    if native:
        dp = e.declare("llvm.x86.avx512bf16.dpbf16ps.512", _V16F32, [_V16F32, _V32BF16, _V32BF16])
    else:
        fma = e.declare("llvm.fma.v16f32", _V16F32, [_V16F32] * 3)
        sixteen = ir.Constant(_V16I32, [16] * LANES)

        def widen(v, first):            # elements first, first + 2, ... as float32
            idx = ir.Constant(ir.VectorType(I32, LANES), list(range(first, CHUNK, 2)))
            return b.bitcast(b.shl(b.zext(b.shuffle_vector(v, v, idx), _V16I32), sixteen), _V16F32)

        def dp(args):
            a, xv, wv = args
            a = b.call(fma, [widen(xv, 1), widen(wv, 1), a])
            return b.call(fma, [widen(xv, 0), widen(wv, 0), a])
    acc = [[cgutils.alloca_once_value(b, ir.Constant(_V16F32, None)) for _ in range(C)] for _ in range(RV)]
    with cgutils.for_range_slice(b, const64(0), xshape[1], const64(CHUNK)) as (d, _):
        ofs = b.mul(d, const64(2))
        if prefetch:
            for r in range(RV):
                e.prefetch_read(e.addr(tp, tstride, r, ofs, prefetch))
        vt = _V32BF16 if native else _V32I16
        w = [b.bitcast(e.load(e.addr(tp, tstride, r, ofs), _V32I16), vt) for r in range(RV)]
        for c in range(C):
            xv = b.bitcast(e.load(e.addr(xp, xstride, c, ofs), _V32I16), vt)
            for r in range(RV):
                b.store(b.call(dp, [b.load(acc[r][c]), xv, w[r]]) if native else dp([b.load(acc[r][c]), xv, w[r]]),
                        acc[r][c])

    def part(a, n, lo):
        return b.shuffle_vector(a, a, ir.Constant(ir.VectorType(I32, n), list(range(lo, lo + n))))

    ary = context.make_array(out_t)(context, b, out)
    for r in range(RV):
        for c in range(C):
            a = b.load(acc[r][c])
            s8 = b.fadd(part(a, 8, 0), part(a, 8, 8))
            s4 = b.fadd(part(s8, 4, 0), part(s8, 4, 4))
            s2 = b.fadd(part(s4, 2, 0), part(s4, 2, 2))
            total = b.fadd(b.extract_element(s2, ir.Constant(I32, 0)), b.extract_element(s2, ir.Constant(I32, 1)))
            ptr = cgutils.get_item_pointer(context, b, out_t, ary, [b.add(t0, const64(c)), b.add(v0, const64(r))],
                                           wraparound=False)
            b.store(total, ptr)


def _tile(RV, C, prefetch=0, native=True):
    """An intrinsic ``(table, xb, v0, t0, out)``: vocabulary rows [v0, v0 + RV) against token rows [t0, t0 + C)
    (``native``: with ``vdpbf16ps``)."""
    @intrinsic
    def tile(typingctx, table, xb, v0, t0, out):
        if not all(isinstance(a, types.Array) and a.ndim == 2 for a in (table, xb, out)) \
                or table.dtype != types.uint16 or xb.dtype != types.uint16 or out.dtype != types.float32:
            return None
        sig = types.void(table, xb, types.intp, types.intp, out)

        def codegen(context, builder, sig, args):
            _emit_tile(Emit(builder), context, sig, args, RV, C, prefetch, native)
            return context.get_dummy_value()
        return sig, codegen
    return tile


_n64, _n14, _n81, _n11 = (_tile(6, 4, 0, HAS_AVX512_BF16), _tile(1, 4, 0, HAS_AVX512_BF16),
                          _tile(8, 1, LM_PREFETCH, HAS_AVX512_BF16), _tile(1, 1, LM_PREFETCH, HAS_AVX512_BF16))
_f24, _f14, _f81, _f11 = _tile(2, 4, 0, False), _tile(1, 4, 0, False), _tile(8, 1, LM_PREFETCH, False), \
    _tile(1, 1, LM_PREFETCH, False)


@njit(**JIT_EXACT_PARALLEL)
def _lm_head_tiles(xb, table, out, native):
    """``embedding._lm_head_avx2``'s task split: a task's vocabulary rows stay in L2 while 4 token rows at a time
    pass (6 vocabulary rows per tile with ``vdpbf16ps``: 24 zmm accumulators; 2 with FMAs, whose widened operands
    need more registers); the last R % 4 rows (and one-stream decode) stream the rows 8 at a time. The ``native``
    tiles are the FMA ones where the CPU lacks AVX512_BF16 (never chosen there, but compiled)."""
    R = xb.shape[0]
    V = table.shape[0]
    RV = 6 if native else 2
    for task in prange((V + VOCAB_TASK - 1) // VOCAB_TASK):
        v_lo = task * VOCAB_TASK
        v_hi = min(V, v_lo + VOCAB_TASK)
        t = 0
        while t + 4 <= R:
            v = v_lo
            while v + RV <= v_hi:
                if native:
                    _n64(table, xb, v, t, out)
                else:
                    _f24(table, xb, v, t, out)
                v += RV
            while v < v_hi:
                if native:
                    _n14(table, xb, v, t, out)
                else:
                    _f14(table, xb, v, t, out)
                v += 1
            t += 4
        while t < R:
            v = v_lo
            while v + 8 <= v_hi:
                if native:
                    _n81(table, xb, v, t, out)
                else:
                    _f81(table, xb, v, t, out)
                v += 8
            while v < v_hi:
                if native:
                    _n11(table, xb, v, t, out)
                else:
                    _f11(table, xb, v, t, out)
                v += 1
            t += 1


# ---- the bound of the argmax lm_head's bf16 screen ---------------------------------------------------------
#
# The bf16 logits A_v are within eps_v = c ||x|| ||w_v|| of the float32 logits R_v (``argmax_bound``), so the
# float32 argmax is among the candidates {v : A_v + eps_v >= max_u (A_u - eps_u)} (``argmax_screen``).

U_BF16 = 2.0 ** -8              # unit roundoff of bfloat16 (8 significant bits, round to nearest even)
_REL_SLACK = 1e-12              # covers float64 rounding in the norms


def argmax_bound(D: int) -> float:
    """c with |A - R| <= c ||x|| ||w|| for one row x and one table row w of width D, where A is the bf16 logit
    (x and w rounded to bfloat16, each product exact in float32, float32 sums) and R the float32 one (``embedding``
    lm_head: float32 products and sums). Each rounding to bfloat16 moves a value by at most U_BF16 relative, so a
    product by at most (2u + u^2) |x_i w_i|; each sum of at most n = padded_dim(D) roundings (float32, unit
    2^-24) moves by gamma_n = n 2^-24 / (1 - n 2^-24) times the sum of the magnitudes, for A (of the rounded
    products, at most (1 + u)^2 |x_i w_i|) and for R; and sum |x_i w_i| <= ||x|| ||w|| (Cauchy-Schwarz). Times
    1.001 for the float64 arithmetic that evaluates the bound."""
    n = padded_dim(D)
    gamma = n * 2.0 ** -24 / (1 - n * 2.0 ** -24)
    return (2 * U_BF16 + U_BF16 ** 2 + gamma * (1 + (1 + U_BF16) ** 2)) * 1.001


def row_norm_bounds(table, out):
    """out[v] >= ||w_v|| (float64) for the table row whose bfloat16 rounding is ``table[v]`` (``bf16_table``'s uint16
    [V, Dp]): each |w_i| <= |w~_i| / (1 - U_BF16), so ||w|| <= ||w~|| / (1 - U_BF16). Computed from the rounded
    table (in memory) rather than the file's (whose pages ``Model.bf16_lm_head`` released)."""
    if table.dtype != np.uint16 or table.ndim != 2 or out.dtype != np.float64 or out.shape != (table.shape[0],):
        raise ValueError(f"row_norm_bounds: table {table.shape} {table.dtype}, out {out.shape} {out.dtype}")
    _row_norm_bounds(table, out)


@njit(**JIT_PARALLEL)
def _row_norm_bounds(table, out):
    V, Dp = table.shape
    for task in prange((V + VOCAB_TASK - 1) // VOCAB_TASK):
        row = np.empty(Dp, np.float32)
        for v in range(task * VOCAB_TASK, min(V, (task + 1) * VOCAB_TASK)):
            _widen_bf16(table[v], row)
            s = 0.0
            for d in range(Dp):
                s += np.float64(row[d]) * np.float64(row[d])
            out[v] = np.sqrt(s) / (1.0 - U_BF16) * (1.0 + _REL_SLACK)
