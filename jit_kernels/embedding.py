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
    """dst float32 [D] <- row src (uint16 half/bf16 bits) widened."""
    D = src.shape[0]
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


def lm_head(x, table, kind, scratch, out):
    """out[r, v] = x[r] . table[v]. x float32 [R, D]; table [V, D] (uint16 bits or float32);
    scratch float32 [n_threads, D] (one widened row per worker thread); out float32 [R, V]."""
    R, D = x.shape
    V = table.shape[0]
    if table.shape[1] != D or out.shape[0] < R or out.shape[1] != V:
        raise ValueError(f"lm_head: x {x.shape}, table {table.shape}, out {out.shape} do not match")
    if kind != F32 and (scratch.shape[0] < numba.config.NUMBA_NUM_THREADS or scratch.shape[1] != D):
        raise ValueError(f"lm_head: scratch {scratch.shape} must be [>= {numba.config.NUMBA_NUM_THREADS}, {D}]")
    if kind == F32:
        _lm_head_f32(x, table, out)
    else:
        _lm_head_u16(x, table, kind, scratch, out)


@njit(**JIT_PARALLEL)
def _lm_head_u16(x, table, kind, scratch, out):
    R, D = x.shape
    for v in prange(table.shape[0]):
        row = scratch[numba.get_thread_id()]
        _widen_row(table[v], kind, row)
        for r in range(R):
            acc = np.float32(0.0)
            for d in range(D):
                acc += row[d] * x[r, d]
            out[r, v] = acc


@njit(**JIT_PARALLEL)
def _lm_head_f32(x, table, out):
    R, D = x.shape
    for v in prange(table.shape[0]):
        row = table[v]
        for r in range(R):
            acc = np.float32(0.0)
            for d in range(D):
                acc += row[d] * x[r, d]
            out[r, v] = acc
