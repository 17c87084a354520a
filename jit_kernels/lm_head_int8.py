"""The int8 screen of the argmax lm_head: exact integer dots of int8-quantized logit rows with an int8-quantized copy
of the lm_head table, half the bytes of the F16 table and, with AVX-512 VNNI, twice the multiply-adds per
instruction of ``vdpbf16ps``.

Each table row w (its exact float32 values) is stored as q = rint(w / s) in [-127, 127] with s = max|w| / 127
(float64), as the bytes q + 128, with three float64 bounds per row: the scale s, E >= ||w - s q|| and W >= ||w||.
A logit row x (float32) is quantized the same way per row (sx, qx). Then, exactly,

    x . w = sx s (qx . q) + sx (qx . (w - s q)) + (x - sx qx) . w

so the screen's logit A = sx s (qx . q) (an exact integer dot, scaled in float64) is within
sx ||qx|| E + ||x - sx qx|| W of x . w (Cauchy-Schwarz), and the float32 lm_head's logit within gamma_n ||x|| W
more (float32 sums of n products, ``f32_sum_bound``): eps = P E + Q W with P = sx ||qx|| and
Q = ||x - sx qx|| + gamma_n ||x|| per logit row (``quantize_rows``). ``argmax_screen.argmax_candidates`` takes it
from there. The bound uses the actual quantization residuals, so it is tight where the values are spread evenly
and loose where a few outliers set a scale.

Outliers of a logit row (a few values far above its RMS, as the final hidden states of large models often have:
with 4 values at 10x the RMS the step of a plain absmax row is ~3x coarser and a random-weight 2B4T row had ~12,600
candidates instead of ~560) are kept apart: of its ``ocoef.shape[1]`` largest values, those above ``OUTLIER_RMS``
times the RMS of the others get integer coefficients c = rint(x_d / sx) on the step sx of the other values (up to
``COEF_MAX``) instead of int8 codes, so the row is x^ = sx k with k its int8 codes and those coefficients. The dots
add c (codes[v, d] - OFFSET) for them (``lm_head_int8``, in the tile's task while its rows are in L2), still exact
integers, and the bound is the same with x^ for sx qx: P = ||x^||, Q = ||x - x^|| + gamma_n ||x||.

Paths (exact integers: every path gives the same dots): ``amx`` from ``ternary_amx.AMX_MIN_ROWS`` rows on,
``tdpbusd`` tile products of 16 table rows read in place (unsigned) by 16 logit rows in the VNNI layout (signed,
made once per call), each C tile transposed in registers into ``out``'s rows (2B4T table from DRAM, 2 threads, an
Intel Xeon with AMX: 16 / 32 rows 14-16 / 17 ms against 25-30 / 34-36 for avx512's tiles), fewer rows and a
task's rows past its last whole 16 on avx512's; ``avx512`` LLVM-IR tiles with ``vpdpbusd`` (the table's
unsigned bytes times the row's signed ones, 64 per instruction; 6 vocabulary x 4 token rows, 8 x 1 prefetching
ahead for one-stream decode), the offset 128 taken off with the row's sum; ``avx2`` tiles with ``vpmaddubsw`` on
|q| and the row's bytes signed like q, then ``vpmaddwd`` (2 x 4 and 8 x 1); ``portable`` a plain loop (correct,
not fast: "auto" takes the screen on the SIMD families only, ``has_fast_path``). 2B4T table, 2 threads, AMD Zen 4,
the dots alone: 1 / 8 / 32 rows 10.1 / 16.2 / 35.5 ms (avx512) and 11.0 / 30.2 / 86.2 (avx2) against the
float32 lm_head's 19.2 / 38.9 / 112.9 and 19.2 / 46.9 / 119.7.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ._config import JIT_EXACT, JIT_EXACT_PARALLEL
from ._cpu import HAS_AVX512, KERNEL, check_kernel, simd_family
from ._ir import I8, I16, I32, Emit, const64
from .embedding import BF16, F16, F32, LM_PREFETCH, VOCAB_TASK, _widen_row
from .ternary_amx import (AMX_MIN_ROWS, TILE, TILE_BYTES, TILE_K, _address, _aligned, _EmitAMX, _tile_config,
                          _tile_release, store_accumulators, tile_registers, transpose_plan)

CHUNK = 64            # bytes per vpdpbusd operand: D is padded to a multiple of it
OFFSET = 128          # table bytes are q + OFFSET (vpdpbusd's unsigned operand)
QMAX = 127
OUTLIERS = 8         # outliers a logit row may have (``ArgmaxHead``'s buffers)
OUTLIER_RMS = 4.0     # a logit row's values above this many times the RMS of its others are outliers (Gaussian
                      # rows of 2560: ~0.16 a row)
COEF_MAX = 1 << 20    # largest outlier coefficient: the step grows rather than a coefficient exceed it
_REL = 1e-12          # float64 rounding in the norms and scales (relative, far above the ~D 2^-53 it covers)


def padded_dim(D: int) -> int:
    """D rounded up to a multiple of CHUNK: the width of the int8 table and rows (padding: q = 0)."""
    return -(-D // CHUNK) * CHUNK


def has_fast_path(kernel=None) -> bool:
    """Whether ``lm_head_int8`` takes SIMD tiles here (``vpdpbusd`` in the ``avx512`` family, ``vpmaddubsw`` in
    ``avx2``), rather than the plain loop."""
    return simd_family(KERNEL if kernel is None else kernel) in ("avx512", "avx2")


def f32_sum_bound(D: int) -> float:
    """gamma_n for the float32 lm_head's logit of width D: |R - x . w| <= gamma_n sum |x_i w_i| <= gamma_n ||x||
    ||w||, n = D rounded up to 32 (every product and sum of a lane chain and of the lane sum rounds at most once
    per element; unit roundoff 2^-24), with the same 1.001 margin as ``lm_head_bf16.argmax_bound``."""
    n = -(-D // 32) * 32
    return n * 2.0 ** -24 / (1 - n * 2.0 ** -24) * 1.001


# ---- the table ---------------------------------------------------------------------------------------------

def int8_table(table, kind, codes, scale, enorm, wnorm):
    """codes[v] (uint8 [V, padded_dim(D)]) <- q + OFFSET for table row v (``kind`` from ``embedding``: F16 / BF16
    bits as uint16, or float32), scale[v] <- s, enorm[v] >= ||w - s q||, wnorm[v] >= ||w|| (float64 [V]; module
    docstring). A row of zeros has s = 0; a row with a value that is not finite has s = NaN and infinite norms,
    so every logit row falls back to the float32 lm_head."""
    V, D = table.shape
    Dp = padded_dim(D)
    if codes.shape != (V, Dp) or codes.dtype != np.uint8 or not codes.flags.c_contiguous:
        raise ValueError(f"int8_table: codes {codes.shape} {codes.dtype} must be C-contiguous uint8 {(V, Dp)}")
    if any(a.shape != (V,) or a.dtype != np.float64 for a in (scale, enorm, wnorm)):
        raise ValueError(f"int8_table: scale, enorm and wnorm must be float64 [{V}]")
    if table.dtype != (np.float32 if kind == F32 else np.uint16) or kind not in (F32, F16, BF16):
        raise TypeError(f"int8_table: table dtype {table.dtype} does not match kind {kind}")
    _int8_table(table, kind, codes, scale, enorm, wnorm)


@njit(**JIT_EXACT)
def _quantize_table_row(w, q):
    """q[:len(w)] <- rint(w / s) + OFFSET, s = max|w| / QMAX; q[len(w):] <- OFFSET. Returns (s, ||w - s (q -
    OFFSET)||, ||w||), the norms rounded up to cover float64 rounding; s NaN and infinite norms when w holds a value
    that is not finite."""
    D = w.shape[0]
    amax = 0.0
    for d in range(D):
        amax = max(amax, abs(np.float64(w[d])))
    q[:] = OFFSET
    if not np.isfinite(amax):
        return np.nan, np.inf, np.inf
    if amax == 0.0:
        return 0.0, 0.0, 0.0
    s = amax / QMAX
    e2 = w2 = 0.0
    for d in range(D):
        v = np.float64(w[d])
        k = min(max(np.rint(v / s), -QMAX), QMAX)
        q[d] = k + OFFSET
        r = v - s * k
        e2 += r * r
        w2 += v * v
    # each r is v - s k rounded once (|error| <= 2^-53 |s k| <= 2^-53 amax): the absolute term covers D of them
    slack = np.sqrt(np.float64(D)) * amax * 2.0 ** -50
    return s, np.sqrt(e2) * (1 + _REL) + slack, np.sqrt(w2) * (1 + _REL)


@njit(**JIT_EXACT_PARALLEL)
def _int8_table(table, kind, codes, scale, enorm, wnorm):
    V, D = table.shape
    for task in prange((V + VOCAB_TASK - 1) // VOCAB_TASK):
        row = np.empty(D, np.float32)
        for v in range(task * VOCAB_TASK, min(V, (task + 1) * VOCAB_TASK)):
            if kind == F32:
                row[:] = table[v]
            else:
                _widen_row(table[v], kind, row)
            scale[v], enorm[v], wnorm[v] = _quantize_table_row(row, codes[v])


# ---- the logit rows -----------------------------------------------------------------------------------------

def quantize_rows(x, xq, xsum, xscale, P, Q, odims, ocoef):
    """For each row r of x (float32 [R, D]): xq[r] (int8 [>= R, padded_dim(D)]) <- its int8 codes (0 at its
    outliers and in the padding), xsum[r] (int32) <- their sum, odims[r] / ocoef[r] (int64 / int32 [>= R, K]) <- its
    outliers' columns and coefficients (0 / 0 in unused slots), xscale[r] <- sx, P[r] >= ||x^||, Q[r] >= ||x - x^||
    + gamma_n ||x|| (float64 [>= R]; module docstring). A row with a value that is not finite gets NaN bounds."""
    R, D = x.shape
    K = ocoef.shape[1] if ocoef.ndim == 2 else -1
    if x.dtype != np.float32 or xq.dtype != np.int8 or xq.shape[0] < R or xq.shape[1] != padded_dim(D) \
            or not xq.flags.c_contiguous or xsum.dtype != np.int32 or xsum.shape[0] < R \
            or any(a.dtype != np.float64 or a.shape[0] < R for a in (xscale, P, Q)) or ocoef.dtype != np.int32 \
            or odims.dtype != np.int64 or ocoef.ndim != 2 or odims.shape != ocoef.shape or ocoef.shape[0] < R \
            or not coefficients_fit(xq.shape[1], K):
        raise ValueError(f"quantize_rows: x {x.shape} {x.dtype}, xq {xq.shape} {xq.dtype}, xsum {xsum.shape} "
                         f"{xsum.dtype}, xscale {xscale.shape}, P {P.shape}, Q {Q.shape}, odims {odims.shape} "
                         f"{odims.dtype}, ocoef {ocoef.shape} {ocoef.dtype} do not match")
    _quantize_rows(x, xq, xsum, xscale, P, Q, odims, ocoef, f32_sum_bound(D))


def coefficients_fit(Dp: int, K: int) -> bool:
    """Whether every dot of rows of width Dp with K outliers fits int32: |dot| <= Dp 127 127 + K 127 COEF_MAX."""
    return K >= 0 and Dp * QMAX * QMAX + K * QMAX * COEF_MAX < 2 ** 31


@njit(**JIT_EXACT)
def _quantize_rows(x, xq, xsum, xscale, P, Q, odims, ocoef, gamma):
    D = x.shape[1]
    K = ocoef.shape[1]
    top = np.empty(K, np.float64)
    outlier = np.zeros(D, np.bool_)
    for r in range(x.shape[0]):
        row, q = x[r], xq[r]
        q[:] = 0
        odims[r] = 0
        ocoef[r] = 0
        xsum[r] = 0
        amax = ss = 0.0
        for d in range(D):
            v = abs(np.float64(row[d]))
            amax = max(amax, v)
            ss += v * v
        if not (np.isfinite(amax) and np.isfinite(ss)) or amax == 0.0:
            xscale[r] = P[r] = Q[r] = 0.0 if amax == 0.0 else np.nan
            continue
        # the K largest values (in decreasing order, equal ones in column order), then the outliers among them:
        # those above OUTLIER_RMS x the RMS of the others (which a few huge values do not inflate)
        n = 0
        rest = 0.0                                     # the largest value not among them
        for d in range(D):
            v = abs(np.float64(row[d]))
            if K == 0 or (n == K and v <= top[K - 1]):
                rest = max(rest, v)
                continue
            if n == K:
                rest = max(rest, top[K - 1])
                n -= 1
            i = n
            while i > 0 and top[i - 1] < v:
                top[i] = top[i - 1]
                odims[r, i] = odims[r, i - 1]
                i -= 1
            top[i] = v
            odims[r, i] = d
            n += 1
        for j in range(n):
            outlier[odims[r, j]] = True
        rest_ss = 0.0
        for d in range(D):
            v = np.float64(row[d])
            rest_ss += 0.0 if outlier[d] else v * v
        limit = OUTLIER_RMS * np.sqrt(rest_ss / max(D - n, 1))
        m = 0
        while m < n and top[m] > limit:
            m += 1
        bulk = max(rest, top[m]) if m < n else rest
        for j in range(m, n):
            outlier[odims[r, j]] = False
            odims[r, j] = 0
        n = m
        s = max(bulk / QMAX, amax / COEF_MAX)
        e2 = k2 = 0.0
        t = 0
        for d in range(D):
            v = np.float64(row[d])
            k = np.rint(v / s)
            if not outlier[d]:
                k = min(max(k, -QMAX), QMAX)
                q[d] = k
                t += np.int32(k)
            res = v - s * k
            e2 += res * res
            k2 += k * k                                # exact: integers, sum < 2^53
        for j in range(n):
            d = odims[r, j]
            ocoef[r, j] = np.int32(np.rint(np.float64(row[d]) / s))
            outlier[d] = False
        xsum[r] = t
        xscale[r] = s
        # each residual v - s k is rounded at most twice (|error| <= 2^-52 amax): the absolute term covers D of them
        e = np.sqrt(e2) * (1 + _REL) + np.sqrt(np.float64(D)) * amax * 2.0 ** -50
        P[r] = s * np.sqrt(k2) * (1 + _REL)
        Q[r] = (e + gamma * np.sqrt(ss) * (1 + _REL)) * (1 + _REL)


# ---- the dots -----------------------------------------------------------------------------------------------

def lm_head_int8(xq, xsum, odims, ocoef, codes, out, kernel=None):
    """out[r, v] (int32 [>= R, V]) <- sum_d (codes[v, d] - OFFSET) xq[r, d] + sum_j (codes[v, odims[r, j]] - OFFSET)
    ocoef[r, j] for r < R = len(xq): exact (``coefficients_fit``). xq, xsum, odims, ocoef from ``quantize_rows``;
    codes from ``int8_table``."""
    R, Dp = xq.shape
    V = codes.shape[0]
    if Dp % CHUNK or codes.shape[1] != Dp or out.shape[0] < R or out.shape[1] != V or xq.dtype != np.int8 \
            or codes.dtype != np.uint8 or out.dtype != np.int32 or xsum.dtype != np.int32 or xsum.shape[0] < R \
            or not (xq.flags.c_contiguous and codes.flags.c_contiguous) or odims.dtype != np.int64 \
            or ocoef.dtype != np.int32 or ocoef.ndim != 2 or odims.shape != ocoef.shape or ocoef.shape[0] < R \
            or not coefficients_fit(Dp, ocoef.shape[1]):
        raise ValueError(f"lm_head_int8: xq {xq.shape} {xq.dtype}, codes {codes.shape} {codes.dtype}, out "
                         f"{out.shape} {out.dtype}, xsum {xsum.shape} {xsum.dtype}, odims {odims.shape} "
                         f"{odims.dtype}, ocoef {ocoef.shape} {ocoef.dtype} do not match")
    if R and ((odims[:R] < 0) | (odims[:R] >= Dp) | (np.abs(ocoef[:R].astype(np.int64)) > COEF_MAX)).any():
        raise ValueError(f"lm_head_int8: an outlier column lies outside [0, {Dp}) or a coefficient beyond "
                         f"{COEF_MAX}")
    kernel = check_kernel("lm_head_int8", KERNEL if kernel is None else kernel)
    if R == 0:
        return
    if kernel == "portable":
        _lm_head_plain(xq, xsum, odims, ocoef, codes, out)
    elif kernel == "amx":
        _lm_head_amx(xq, xsum, odims, ocoef, codes, out)
    else:
        _lm_head_tiles(xq, xsum, odims, ocoef, codes, out, simd_family(kernel) == "avx512")


@njit(inline="always", **JIT_EXACT)
def _add_outliers(odims, ocoef, codes, out, R, v_lo, v_hi):
    """out[r, v] += (codes[v, odims[r, j]] - OFFSET) ocoef[r, j] for v in [v_lo, v_hi): after a task's tiles, while
    its table rows are in L2."""
    for t in range(R):
        for j in range(ocoef.shape[1]):
            c = ocoef[t, j]
            if c != 0:
                d = odims[t, j]
                for v in range(v_lo, v_hi):
                    out[t, v] += (np.int32(codes[v, d]) - np.int32(OFFSET)) * c


@njit(**JIT_EXACT_PARALLEL)
def _lm_head_plain(xq, xsum, odims, ocoef, codes, out):
    R, Dp = xq.shape
    V = codes.shape[0]
    for task in prange((V + VOCAB_TASK - 1) // VOCAB_TASK):
        v_lo = task * VOCAB_TASK
        v_hi = min(V, v_lo + VOCAB_TASK)
        for v in range(v_lo, v_hi):
            w = codes[v]
            for t in range(R):
                x = xq[t]
                acc = np.int32(0)
                for d in range(Dp):
                    acc += np.int32(w[d]) * np.int32(x[d])
                out[t, v] = acc - np.int32(OFFSET) * xsum[t]
        _add_outliers(odims, ocoef, codes, out, R, v_lo, v_hi)


_V16I32, _V8I32 = ir.VectorType(I32, 16), ir.VectorType(I32, 8)
_V32I8, _V16I16 = ir.VectorType(I8, 32), ir.VectorType(I16, 16)


def _emit_tile(e, context, sig, args, RV, C, prefetch, native):
    """IR: out[t0 + c, v0 + r] for r < RV, c < C. ``native``: 16 int32 lanes per (r, c), one ``vpdpbusd`` per
    64-byte chunk (table bytes unsigned, row bytes signed), then the lane sum less OFFSET * xsum[t0 + c]. Else
    (AVX2) 8 int32 lanes per (r, c) and 32-byte chunk: q = codes ^ 0x80, ``vpmaddubsw`` of |q| (unsigned) with the
    row's bytes signed like q (``vpsignb``; pairs of products <= 2 127 127, no int16 saturation), ``vpmaddwd``
    with ones into the lanes: q . x itself."""
    b = e.b
    codes_t, x_t, xsum_t, out_t = sig.args[0], sig.args[1], sig.args[2], sig.args[5]
    codes, x, xsum, v0, t0, out = args
    tp, tstride, _ = e.data_address(context, codes_t, codes, v0)
    xp, xstride, xshape = e.data_address(context, x_t, x, t0)
    if native:
        vt, step = _V16I32, CHUNK
        dp = e.declare("llvm.x86.avx512.vpdpbusd.512", _V16I32, [_V16I32] * 3)
        total = e.declare("llvm.vector.reduce.add.v16i32", I32, [_V16I32])
    else:
        vt, step = _V32I8, 32
        maddubs = e.declare("llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
        maddwd = e.declare("llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
        psign = e.declare("llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8])
        absb = e.declare("llvm.abs.v32i8", _V32I8, [_V32I8, ir.IntType(1)])
        total = e.declare("llvm.vector.reduce.add.v8i32", I32, [_V8I32])
        flip, ones = ir.Constant(_V32I8, [-128] * 32), ir.Constant(_V16I16, [1] * 16)
    acc_t = _V16I32 if native else _V8I32
    acc = [[cgutils.alloca_once_value(b, ir.Constant(acc_t, None)) for _ in range(C)] for _ in range(RV)]
    with cgutils.for_range_slice(b, const64(0), xshape[1], const64(step)) as (d, _):
        if prefetch:
            for r in range(RV):
                e.prefetch_read(e.addr(tp, tstride, r, d, prefetch))
        w = [e.load(e.addr(tp, tstride, r, d), vt) for r in range(RV)]
        if not native:
            q = [b.xor(v, flip) for v in w]
            w = [b.call(absb, [v, ir.Constant(ir.IntType(1), 0)]) for v in q]
        for c in range(C):
            xv = e.load(e.addr(xp, xstride, c, d), vt)
            for r in range(RV):
                a = b.load(acc[r][c])
                if native:
                    a = b.call(dp, [a, w[r], xv])
                else:
                    pairs = b.call(maddubs, [w[r], b.call(psign, [xv, q[r]])])
                    a = b.add(a, b.call(maddwd, [pairs, ones]))
                b.store(a, acc[r][c])
    ary = context.make_array(out_t)(context, b, out)
    sums = context.make_array(xsum_t)(context, b, xsum)
    for c in range(C):
        t = b.add(t0, const64(c))
        if native:
            s = b.load(cgutils.get_item_pointer(context, b, xsum_t, sums, [t], wraparound=False))
            offset = b.mul(s, ir.Constant(I32, OFFSET))
        for r in range(RV):
            ptr = cgutils.get_item_pointer(context, b, out_t, ary, [t, b.add(v0, const64(r))], wraparound=False)
            dot = b.call(total, [b.load(acc[r][c])])
            b.store(b.sub(dot, offset) if native else dot, ptr)


def _tile(RV, C, prefetch=0, native=True):
    """An intrinsic ``(codes, xq, xsum, v0, t0, out)``: vocabulary rows [v0, v0 + RV) against token rows
    [t0, t0 + C) (``native``: with ``vpdpbusd``, else AVX2)."""
    @intrinsic
    def tile(typingctx, codes, xq, xsum, v0, t0, out):
        if not (all(isinstance(a, types.Array) for a in (codes, xq, xsum, out)) and codes.dtype == types.uint8
                and xq.dtype == types.int8 and xsum.dtype == types.int32 and out.dtype == types.int32):
            return None
        sig = types.void(codes, xq, xsum, types.intp, types.intp, out)

        def codegen(context, builder, sig, args):
            _emit_tile(Emit(builder), context, sig, args, RV, C, prefetch, native)
            return context.get_dummy_value()
        return sig, codegen
    return tile


# one token row streams the table (memory bound): 8 rows a tile, each prefetched LM_PREFETCH bytes ahead (8 x 1,
# 2B4T table, 2 threads, AMD Zen 4: 9.8-10.2 ms at 48-96 KB, 11.5 ms with none)
# the vpdpbusd tiles only where the CPU Numba compiles for has them: elsewhere LLVM cannot select the instruction
# and aborts the process when the driver, which holds both kinds, compiles (the AVX2 tiles stand in, never chosen)
_n64, _n14, _n81, _n11 = (_tile(6, 4, 0, HAS_AVX512), _tile(1, 4, 0, HAS_AVX512),
                          _tile(8, 1, LM_PREFETCH, HAS_AVX512), _tile(1, 1, LM_PREFETCH, HAS_AVX512))
_a24, _a14, _a81, _a11 = _tile(2, 4, 0, False), _tile(1, 4, 0, False), _tile(8, 1, LM_PREFETCH, False), \
    _tile(1, 1, LM_PREFETCH, False)


@njit(**JIT_EXACT_PARALLEL)
def _lm_head_tiles(xq, xsum, odims, ocoef, codes, out, native):
    """``lm_head_bf16._lm_head_tiles``' task split: a task's vocabulary rows stay in L2 while 4 token rows at a
    time pass (6 vocabulary rows a tile with ``vpdpbusd``: 24 zmm accumulators; 2 with AVX2); the last R % 4 rows
    stream 8 at a time; then the task's outlier terms."""
    R = xq.shape[0]
    V = codes.shape[0]
    RV = 6 if native else 2
    for task in prange((V + VOCAB_TASK - 1) // VOCAB_TASK):
        v_lo = task * VOCAB_TASK
        v_hi = min(V, v_lo + VOCAB_TASK)
        t = 0
        while t + 4 <= R:
            v = v_lo
            while v + RV <= v_hi:
                if native:
                    _n64(codes, xq, xsum, v, t, out)
                else:
                    _a24(codes, xq, xsum, v, t, out)
                v += RV
            while v < v_hi:
                if native:
                    _n14(codes, xq, xsum, v, t, out)
                else:
                    _a14(codes, xq, xsum, v, t, out)
                v += 1
            t += 4
        while t < R:
            v = v_lo
            while v + 8 <= v_hi:
                if native:
                    _n81(codes, xq, xsum, v, t, out)
                else:
                    _a81(codes, xq, xsum, v, t, out)
                v += 8
            while v < v_hi:
                if native:
                    _n11(codes, xq, xsum, v, t, out)
                else:
                    _a11(codes, xq, xsum, v, t, out)
                v += 1
            t += 1
        _add_outliers(odims, ocoef, codes, out, R, v_lo, v_hi)


# ---- AMX ------------------------------------------------------------------------------------------------------

# a C tile's 16 rows (vocabulary a: lane c = token c) -> 16 vectors (token c: lane a = vocabulary a): four rounds
_TRANSPOSE16 = transpose_plan([[(a, c) for c in range(16)] for a in range(16)], lambda el: el[1])
# the AMX tiles read the table's rows in place, 16 streams a tile: each row prefetched this many 64-byte chunks
# ahead (2B4T table from DRAM, 2 threads, 32 rows: 8 chunks 22 ms, 16 17.3, 32 16.6, none 26.7)
PREFETCH_CHUNKS = 16


def _amx_screen_codegen(TA, TB):
    """TA vocabulary tiles (A: 16 table rows x 64 bytes, unsigned, read in place) x TB token tiles (B: the rows'
    bytes in the VNNI layout, ``_token_vnni``) of ``tdpbusd`` accumulators C[v, t] over all of Dp; then each C tile
    is transposed in registers and out[t, v0 ..] = C[., t] - OFFSET xsum[t] stored for the m real token rows."""
    regC, regA, regB = tile_registers(TA, TB)

    def codegen(context, builder, sig, args):
        codes_v, v0, xb_v, tt0, m, xsum_v, out_v, nchunks = args
        b = builder
        e = _EmitAMX(b)
        tp, tstride, _ = e.data_address(context, sig.args[0], codes_v, v0)
        xb = context.make_array(sig.args[2])(context, b, xb_v)
        bp = b.add(_aligned(b, xb.data), b.mul(b.mul(tt0, nchunks), const64(TILE_BYTES)))
        for reg in sum(regC, []):
            e.tile(e.tilezero, reg)
        with cgutils.for_range(b, nchunks) as loop:
            kc = loop.index
            for ta in range(TA):
                a_addr = b.add(b.add(tp, b.mul(tstride, const64(TILE * ta))), b.mul(kc, const64(TILE_K)))
                ahead = b.add(a_addr, const64(PREFETCH_CHUNKS * TILE_K))   # past a row's end: the next row's
                for r in range(TILE):
                    e.prefetch_read(b.add(ahead, b.mul(tstride, const64(r))))
                e.tile(e.tileload, regA[ta], e.ptr(a_addr), tstride)
            for tb in range(TB):
                b_addr = b.add(bp, b.mul(b.add(kc, b.mul(nchunks, const64(tb))), const64(TILE_BYTES)))
                e.tile(e.tileload, regB[tb], e.ptr(b_addr), const64(TILE_K))
                for ta in range(TA):
                    e.tile(e.tdpbusd, regC[ta][tb], regA[ta], regB[tb])
        cbase = store_accumulators(e, regC)
        sums = context.make_array(sig.args[5])(context, b, xsum_v)
        out = context.make_array(sig.args[6])(context, b, out_v)
        rounds, by_col = _TRANSPOSE16
        for ta in range(TA):
            for tb in range(TB):
                vecs = [b.load(b.inttoptr(b.add(cbase, const64((ta * TB + tb) * 1024 + 64 * r)),
                                          _V16I32.as_pointer()), align=64) for r in range(TILE)]
                for ops in rounds:
                    vecs = [b.shuffle_vector(vecs[x], vecs[y], ir.Constant(_V16I32, idx)) for x, y, idx in ops]
                cols = [vecs[i] for i in by_col]          # cols[t]: the 16 vocabulary rows' dots with token t
                for t in range(TILE):
                    tok = TILE * tb + t
                    with b.if_then(b.icmp_signed("<", const64(tok), m)):
                        row = b.add(b.mul(tt0, const64(TILE)), const64(tok))
                        s = b.load(cgutils.get_item_pointer(context, b, sig.args[5], sums, [row], wraparound=False))
                        splat = e.splat(b.mul(s, ir.Constant(I32, OFFSET)), 16)
                        dst = cgutils.get_item_pointer(context, b, sig.args[6], out,
                                                       [row, b.add(v0, const64(TILE * ta))], wraparound=False)
                        b.store(b.sub(cols[t], splat), b.bitcast(dst, _V16I32.as_pointer()), align=4)
        return context.get_dummy_value()
    return codegen


def _amx_screen(TA, TB):
    """An intrinsic ``(codes, v0, xb, tt0, m, xsum, out, nchunks)``: table rows [v0, v0 + 16 TA) against token
    tiles [tt0, tt0 + TB) of ``xb`` (m of their rows real), into out's int32 dots. Needs the tile configuration
    (``ternary_amx._tile_config``)."""
    codegen = _amx_screen_codegen(TA, TB)

    @intrinsic
    def tiles(typingctx, codes, v0, xb, tt0, m, xsum, out, nchunks):
        if not all(isinstance(a, types.Array) for a in (codes, xb, xsum, out)):
            return None
        return types.void(codes, types.intp, xb, types.intp, types.intp, xsum, out, types.intp), codegen
    return tiles


_s22, _s21, _s12, _s11 = _amx_screen(2, 2), _amx_screen(2, 1), _amx_screen(1, 2), _amx_screen(1, 1)


@njit(**JIT_EXACT)
def _token_vnni(xq, xb):
    """xq int8 [R, Dp] -> B tiles from xb's first cache line: tile (token tile tt, chunk kc) at 1024 (tt Dp / 64 +
    kc), its row i holding, for each of 16 token rows t, xq[16 tt + t, 64 kc + 4i .. 64 kc + 4i + 4] (zeros past R)."""
    R, Dp = xq.shape
    nchunks = Dp // CHUNK
    off = (-_address(xb)) % 64
    ntiles = (R + 15) // 16
    for tt in range(ntiles):
        for kc in range(nchunks):
            base = off + (tt * nchunks + kc) * 1024
            for t in range(16):
                r = 16 * tt + t
                for i in range(16):
                    for j in range(4):
                        xb[base + 64 * i + 4 * t + j] = xq[r, CHUNK * kc + 4 * i + j] if r < R else 0


@njit(**JIT_EXACT_PARALLEL)
def _lm_head_amx(xq, xsum, odims, ocoef, codes, out):
    """AMX tile products for R >= ``ternary_amx.AMX_MIN_ROWS`` rows (fewer: the vpdpbusd tiles): the rows in the
    VNNI layout once, then ``prange`` over tasks of VOCAB_TASK table rows, two table tiles x two token tiles at a
    time; a task's last V % 16 rows on the vpdpbusd tiles; then its outlier terms."""
    R, Dp = xq.shape
    V = codes.shape[0]
    if R < AMX_MIN_ROWS:
        _lm_head_tiles(xq, xsum, odims, ocoef, codes, out, True)
        return
    nchunks = Dp // CHUNK
    ntiles = (R + 15) // 16
    xb = np.empty(ntiles * Dp * 16 + 64, np.int8)
    _token_vnni(xq, xb)
    for task in prange((V + VOCAB_TASK - 1) // VOCAB_TASK):
        v_lo = task * VOCAB_TASK
        v_hi = min(V, v_lo + VOCAB_TASK)
        nv = (v_hi - v_lo) // 16
        if nv > 0:
            _tile_config()
            tt = 0
            while tt < ntiles:
                pair = tt + 2 <= ntiles          # two token tiles, or a last single one
                m = min(32, R - 16 * tt)
                vt = 0
                while vt + 2 <= nv:
                    if pair:
                        _s22(codes, v_lo + 16 * vt, xb, tt, m, xsum, out, nchunks)
                    else:
                        _s21(codes, v_lo + 16 * vt, xb, tt, m, xsum, out, nchunks)
                    vt += 2
                if vt < nv and pair:
                    _s12(codes, v_lo + 16 * vt, xb, tt, m, xsum, out, nchunks)
                elif vt < nv:
                    _s11(codes, v_lo + 16 * vt, xb, tt, m, xsum, out, nchunks)
                tt += 2 if pair else 1
            _tile_release()
        for v in range(v_lo + 16 * nv, v_hi):
            for t in range(0, R - 3, 4):
                _n14(codes, xq, xsum, v, t, out)
            for t in range(R - R % 4, R):
                _n11(codes, xq, xsum, v, t, out)
        _add_outliers(odims, ocoef, codes, out, R, v_lo, v_hi)
