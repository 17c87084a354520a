"""Token embedding lookup and the float lm_head over F16 / BF16 / F32 matrices.

Half-precision matrices stay in their file bytes, viewed as uint16 [V, D]; rows are widened to float32
in registers (F16: sign | (exp,mantissa) << 13, then * 2^112, which is exact for normal and subnormal
halves; BF16: bits << 16). The lm_head is weight-stationary: each vocabulary row is read once per step and
applied to every requested hidden row; work is split over vocabulary rows, never over the D reduction.
"""
import numpy as np
import numba
from numba import njit, prange

from ._config import JIT, JIT_PARALLEL

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
    if T and (tokens[:T].min() < 0 or tokens[:T].max() >= table.shape[0]):
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


ROW_TILE = 4    # the lm_head computes token rows in groups of 4: callers pad R to a multiple of 4


def lm_head(x, table, kind, scratch, out):
    """out[r, v] = x[r] . table[v]. x float32 [R, D] with R a multiple of ROW_TILE (pad with zero rows);
    table [V, D] (uint16 bits or float32); scratch float32 [n_threads, 2 * D] (two widened rows per worker
    thread); out float32 [R, V].

    Register tiling: 2 vocabulary rows x 4 token rows per pass over D (8 accumulators). Every token row goes
    through the same 4-row code whatever its place in the batch, so its logits are bit-identical in any batch."""
    R, D = x.shape
    V = table.shape[0]
    if R % ROW_TILE:
        raise ValueError(f"lm_head: x has {R} rows; pad it to a multiple of {ROW_TILE}")
    if table.shape[1] != D or out.shape[0] < R or out.shape[1] != V or x.dtype != np.float32:
        raise ValueError(f"lm_head: x {x.shape} {x.dtype}, table {table.shape}, out {out.shape} do not match")
    if scratch.shape[0] < numba.config.NUMBA_NUM_THREADS or scratch.shape[1] != 2 * D:
        raise ValueError(f"lm_head: scratch {scratch.shape} must be [>= {numba.config.NUMBA_NUM_THREADS}, {2 * D}]")
    _lm_head(x, table, kind, scratch, out)


@njit(**JIT)
def _dot_tile(x, r, w0, w1, out, v0, v1):
    """out[r..r+3, v0] = x[r..r+3] . w0 and out[r..r+3, v1] = x[r..r+3] . w1."""
    D = x.shape[1]
    x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
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
    out[r, v0], out[r + 1, v0], out[r + 2, v0], out[r + 3, v0] = a0, a1, a2, a3
    out[r, v1], out[r + 1, v1], out[r + 2, v1], out[r + 3, v1] = b0, b1, b2, b3


@njit(**JIT_PARALLEL)
def _lm_head(x, table, kind, scratch, out):
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
        for r in range(0, R, 4):
            _dot_tile(x, r, w0, w1, out, v0, v1)
