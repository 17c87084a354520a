"""Causal GQA attention over a paged KV cache.

Cache layout of one layer (owned and allocated by ``bitnet_batch.engine.kv_cache``)::

    k_cache, v_cache  float32 [n_blocks, n_kv_heads, block_size, head_dim]
    block_tables      int32   [n_seqs, max_blocks_per_seq]   # logical block j of sequence s -> physical block

A step holds T rows (tokens) from any number of sequences: row t belongs to sequence ``row_seq[t]`` at
position ``row_pos[t]``. Its K/V are written first (``kv_write``), then every row attends to positions
0..row_pos[t] of its own sequence, so prefill chunks and decode steps use the same code.
Scores, softmax (two passes over a per-thread score buffer) and the weighted sum are computed in float64
from the float32 cache; query head h reads KV head h // (H / KVH).
"""
import numba
import numpy as np
from numba import njit, prange

from ._config import JIT_PARALLEL


def _check_rows(row_seq, row_pos, block_tables, block_size, T):
    if row_seq.shape[0] < T or row_pos.shape[0] < T:
        raise ValueError("attention: row_seq/row_pos shorter than the number of rows")
    if T and (row_seq[:T].min() < 0 or row_seq[:T].max() >= block_tables.shape[0]):
        raise ValueError("attention: row_seq out of range of block_tables")
    if T and (row_pos[:T].min() < 0 or row_pos[:T].max() >= block_tables.shape[1] * block_size):
        raise ValueError("attention: position beyond the sequence's block table")


def kv_write(k, v, k_cache, v_cache, block_tables, row_seq, row_pos):
    """Store k, v (float32/float64 [T, KVH, hd], rounded to the cache's float32) of each row at its sequence position in the layer's cache."""
    T = k.shape[0]
    if k.shape != v.shape or k.shape[1:] != (k_cache.shape[1], k_cache.shape[3]):
        raise ValueError(f"kv_write: k {k.shape} / v {v.shape} do not match cache {k_cache.shape}")
    _check_rows(row_seq, row_pos, block_tables, k_cache.shape[2], T)
    _kv_write(k, v, k_cache, v_cache, block_tables, row_seq, row_pos)


@njit(**JIT_PARALLEL)
def _kv_write(k, v, k_cache, v_cache, block_tables, row_seq, row_pos):
    T, KVH, hd = k.shape
    bs = k_cache.shape[2]
    for t in prange(T):
        p = row_pos[t]
        blk = block_tables[row_seq[t], p // bs]
        off = p % bs
        for h in range(KVH):
            for d in range(hd):
                k_cache[blk, h, off, d] = k[t, h, d]
                v_cache[blk, h, off, d] = v[t, h, d]


def attention_scratch(n_threads, max_pos, head_dim):
    """The per-thread scratch ``attention`` needs: float64 [n_threads, max_pos + head_dim]."""
    return np.zeros((n_threads, max_pos + head_dim), np.float64)


def attention(q, k_cache, v_cache, block_tables, row_seq, row_pos, out, scratch):
    """out[t, h] = softmax(q[t, h] . K[0..pos] / sqrt(hd)) V[0..pos]; q, out float [T, H, hd].

    scratch float64 [>= n_threads, >= max position + 1 + hd] (see ``attention_scratch``): one row per worker
    thread for the scores of one (row, head) and a contiguous copy of its query."""
    T, H, hd = q.shape
    KVH = k_cache.shape[1]
    if H % KVH or k_cache.shape[3] != hd or out.shape != q.shape or v_cache.shape != k_cache.shape:
        raise ValueError(f"attention: q {q.shape}, cache {k_cache.shape}, out {out.shape} do not match")
    _check_rows(row_seq, row_pos, block_tables, k_cache.shape[2], T)
    need = (int(row_pos[:T].max()) + 1 if T else 0) + hd
    if scratch.dtype != np.float64 or scratch.shape[0] < numba.config.NUMBA_NUM_THREADS or scratch.shape[1] < need:
        raise ValueError(f"attention: scratch {scratch.shape} {scratch.dtype} must be float64 "
                         f"[>= {numba.config.NUMBA_NUM_THREADS}, >= {need}]")
    _attention(q, k_cache, v_cache, block_tables, row_seq, row_pos, 1.0 / np.sqrt(hd), scratch, out)


@njit(**JIT_PARALLEL)
def _attention(q, k_cache, v_cache, block_tables, row_seq, row_pos, scale, scratch, out):
    T, H, hd = q.shape
    KVH = k_cache.shape[1]
    bs = k_cache.shape[2]
    group = H // KVH
    for i in prange(T * H):
        t = i // H
        h = i % H
        kvh = h // group
        table = block_tables[row_seq[t]]
        n = row_pos[t] + 1
        buf = scratch[numba.get_thread_id()]
        sc = buf[:n]                       # scores, then softmax weights
        qv = buf[n:n + hd]                 # contiguous copy of the query
        for d in range(hd):
            qv[d] = q[t, h, d]
        m = -np.inf
        for p in range(n):
            kr = k_cache[table[p // bs], kvh, p % bs]
            s = 0.0
            for d in range(hd):
                s += qv[d] * np.float64(kr[d])
            s *= scale
            sc[p] = s
            if s > m:
                m = s
        l = 0.0
        for p in range(n):
            e = np.exp(sc[p] - m)
            sc[p] = e
            l += e
        acc = out[t, h]
        acc[:] = 0.0
        for p in range(n):
            w = sc[p]
            vr = v_cache[table[p // bs], kvh, p % bs]
            for d in range(hd):
                acc[d] += w * np.float64(vr[d])
        inv = 1.0 / l
        for d in range(hd):
            acc[d] *= inv
