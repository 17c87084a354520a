"""Causal GQA attention over the paged KV cache with an optional sliding window and an explicit score scale.

``attention.attention`` attends to positions 0..p with scale 1 / sqrt(head_dim), which is what the BitNet
generative models need. The embedding models need two more things (``bitnet_batch.model.embedding_forward``):
Gemma3's score scale ``query_pre_attn_scalar ** -0.5`` and its sliding-window layers, where the row at position p
attends to positions max(0, p - W + 1) .. p only (transformers ``sliding_window_overlay``: kv > q - W).
``window <= 0`` means no window (all of 0..p).

Same layout and numerics as ``attention._attention`` (whose helpers it calls): per (row, KV head) task, the query
heads of one KV head computed together, float64 scores, the softmax numerators with the vectorised float64 exp and
one division by their sum at the end. A row's result depends only on its own query and the cache rows it reads,
never on the other rows of the step (bit-identical in any batch).
"""
import numba
import numpy as np
from numba import njit, prange

from . import attention as _att
from ._config import JIT_PARALLEL


def window_attention(q, k_cache, v_cache, block_tables, row_seq, row_pos, window, scale, out, scratch):
    """out[t, h] = softmax(scale * q[t, h] . K[lo..p]) V[lo..p], p = row_pos[t], lo = max(0, p - window + 1) (or 0
    when window <= 0); q, out float64 [T, H, hd]; caches as ``attention.attention``; scratch from
    ``attention.attention_scratch(n_threads, max_pos, hd, H // KVH)``."""
    T, H, hd = q.shape
    KVH = k_cache.shape[1]
    _att._check_cache(k_cache, v_cache, "window_attention")
    if H % KVH or k_cache.shape[3] != hd or out.shape != q.shape:
        raise ValueError(f"window_attention: q {q.shape}, cache {k_cache.shape}, out {out.shape} do not match")
    if q.dtype != np.float64 or out.dtype != np.float64:
        raise TypeError(f"window_attention: q and out must be float64, got {q.dtype}, {out.dtype}")
    n_pos = _att._check_rows(row_seq, row_pos, block_tables, k_cache.shape[2], T)
    group = H // KVH
    need = group * (n_pos + hd) + hd
    if scratch.dtype != np.float64 or scratch.shape[0] < numba.config.NUMBA_NUM_THREADS or scratch.shape[1] < need:
        raise ValueError(f"window_attention: scratch {scratch.shape} {scratch.dtype} must be float64 "
                         f"[>= {numba.config.NUMBA_NUM_THREADS}, >= {need}]")
    _window_attention(q, k_cache, v_cache, block_tables, row_seq, row_pos, np.int64(window), np.float64(scale),
                      scratch, out)


@njit(**JIT_PARALLEL)
def _window_attention(q, k_cache, v_cache, block_tables, row_seq, row_pos, window, scale, scratch, out):
    T, H, hd = q.shape
    KVH = k_cache.shape[1]
    bs = k_cache.shape[2]
    G = H // KVH
    for i in prange(T * KVH):
        t = i // KVH
        kvh = i % KVH
        h0 = kvh * G
        table = block_tables[row_seq[t]]
        last = row_pos[t]
        lo = 0
        if window > 0 and last - window + 1 > 0:
            lo = last - window + 1
        n = last + 1 - lo
        buf = scratch[numba.get_thread_id()]
        sc = buf[:G * n]                              # scores of head h0 + j at [j * n, j * n + n)
        qv = buf[G * n:G * (n + hd)]                  # contiguous copies of the G queries
        kvbuf = buf[G * (n + hd):G * (n + hd) + hd]   # a float16 cache row widened
        _att._gather_queries(q, t, h0, G, qv)
        for j in range(n):
            p = lo + j
            kr = _att._kv_row(k_cache, table[p // bs], kvh, p % bs, kvbuf)
            for g in range(G):
                qg = qv[g * hd:(g + 1) * hd]
                s = 0.0
                for d in range(hd):
                    s += qg[d] * np.float64(kr[d])
                sc[g * n + j] = s * scale
        for g in range(G):
            _att._softmax_numerators(sc[g * n:g * n + n])
            out[t, h0 + g, :] = 0.0
        for j in range(n):
            p = lo + j
            vr = _att._kv_row(v_cache, table[p // bs], kvh, p % bs, kvbuf)
            for g in range(G):
                w = sc[g * n + j]
                acc = out[t, h0 + g]
                for d in range(hd):
                    acc[d] += w * np.float64(vr[d])
        for g in range(G):
            _att._divide_by_mass(sc[g * n:g * n + n], out[t, h0 + g])
