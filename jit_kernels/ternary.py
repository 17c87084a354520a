"""Per-token int8 activation quantization and the exact ternary matmul.

Kernel weight layout ("I2 blocks", the same as bitnet.cpp's x86 I2_S payload, so an I2_S file maps in
without a copy)::

    packed  uint8 [N, K // 4]        # row n = output feature n; K (input dim) padded to a multiple of 128
    block b of a row = bytes [32*b, 32*b + 32) and holds inputs [128*b, 128*b + 128):
        byte m: bits 7-6 -> input 128b + m, bits 5-4 -> 128b + 32 + m,
                bits 3-2 -> 128b + 64 + m, bits 1-0 -> 128b + 96 + m
    code c in {0, 1, 2} means weight c - 1 in {-1, 0, +1}
    wscale  float32 [N]              # per output row (a per-tensor scale repeated)

Math (BitNet b1.58, as bitnet.cpp computes it)::

    s_t   = 127 / max(max|x_t|, 1e-5)                 # per token (row of x)
    q_t   = clamp(rint(x_t * s_t), -128, 127)          # int8, round half to even
    y[t,n] = (sum_k c[n,k] * q[t,k] - sum_k q[t,k]) / s_t * wscale[n]

The integer dot is exact, so a row's result never depends on the batch it is computed in.
"""
import numpy as np
from numba import njit, prange

from ._config import JIT, JIT_PARALLEL

BLOCK = 128          # inputs per packed block
BLOCK_BYTES = 32     # bytes per packed block


def quantize_rows(x, xq, xscale, xsum):
    """Quantize each row of ``x`` (float32 or float64 [T, K]; float64 is rounded to float32 first, the
    quantizer itself runs in float32 arithmetic) into ``xq`` (int8 [T, Kp], Kp >= K, padding zeroed),
    ``xscale`` (float32 [T]: s_t) and ``xsum`` (int32 [T]: sum of the row's int8 values)."""
    T, K = x.shape
    if x.dtype not in (np.float32, np.float64) or xq.dtype != np.int8:
        raise TypeError(f"quantize_rows: want float32/float64 x and int8 xq, got {x.dtype}, {xq.dtype}")
    if xq.shape[0] < T or xq.shape[1] < K or xscale.shape[0] < T or xsum.shape[0] < T:
        raise ValueError(f"quantize_rows: output buffers too small for x {x.shape}: xq {xq.shape}")
    if xscale.dtype != np.float32 or xsum.dtype != np.int32:
        raise TypeError("quantize_rows: xscale must be float32 and xsum int32")
    _quantize_rows(x, xq, xscale, xsum)


@njit(**JIT_PARALLEL)
def _quantize_rows(x, xq, xscale, xsum):
    T, K = x.shape
    Kp = xq.shape[1]
    for t in prange(T):
        amax = np.float32(0.0)
        for k in range(K):
            a = abs(np.float32(x[t, k]))
            if a > amax:
                amax = a
        if amax < np.float32(1e-5):
            amax = np.float32(1e-5)
        s = np.float32(127.0) / amax
        total = 0
        for k in range(K):
            q = np.rint(np.float32(x[t, k]) * s)
            if q > 127.0:
                q = 127.0
            elif q < -128.0:
                q = -128.0
            qi = np.int8(q)
            xq[t, k] = qi
            total += np.int32(qi)
        for k in range(K, Kp):
            xq[t, k] = 0
        xscale[t] = s
        xsum[t] = total


def ternary_matmul(xq, xscale, xsum, packed, wscale, out):
    """out[t, n] = exact ternary dot of row t with weight row n, rescaled (see module docstring).

    xq int8 [T, Kp]; xscale float32 [T]; xsum int32 [T]; packed uint8 [N, Kp // 4]; wscale float32 [N];
    out float32 or float64 [T, N] (may be a view with row stride)."""
    T, Kp = xq.shape
    N, KB = packed.shape
    if xq.dtype != np.int8 or packed.dtype != np.uint8:
        raise TypeError(f"ternary_matmul: want int8 xq / uint8 packed, got {xq.dtype} / {packed.dtype}")
    if Kp % BLOCK or KB * 4 != Kp:
        raise ValueError(f"ternary_matmul: xq width {Kp} must equal 4 * packed width {KB}, a multiple of {BLOCK}")
    if out.shape[0] != T or out.shape[1] != N or wscale.shape[0] != N:
        raise ValueError(f"ternary_matmul: out {out.shape} / wscale {wscale.shape} do not match T={T}, N={N}")
    if out.dtype not in (np.float32, np.float64) or wscale.dtype != np.float32:
        raise TypeError("ternary_matmul: out must be float32/float64 and wscale float32")
    _ternary_matmul(xq, xscale, xsum, packed, wscale, out)


@njit(**JIT_PARALLEL)
def _ternary_matmul(xq, xscale, xsum, packed, wscale, out):
    T, Kp = xq.shape
    N = packed.shape[0]
    nblk = Kp // BLOCK
    # weight-stationary: each weight row is read once from memory and applied to every token row
    for n in prange(N):
        w = packed[n]
        ws = wscale[n]
        for t in range(T):
            x = xq[t]
            acc = 0
            for b in range(nblk):
                wb = w[b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES]
                xb = x[b * BLOCK:(b + 1) * BLOCK]
                a = 0
                for m in range(BLOCK_BYTES):
                    c = np.int32(wb[m])
                    a += ((c >> 6) & 3) * np.int32(xb[m]) \
                        + ((c >> 4) & 3) * np.int32(xb[m + 32]) \
                        + ((c >> 2) & 3) * np.int32(xb[m + 64]) \
                        + (c & 3) * np.int32(xb[m + 96])
                acc += a
            # float64 epilogue: exact for |acc| < 2^53, rounded once when stored
            out[t, n] = np.float64(acc - xsum[t]) / np.float64(xscale[t]) * np.float64(ws)
