"""Causal GQA attention over a paged KV cache.

Cache layout of one layer (owned and allocated by ``bitnet_batch.engine.kv_cache``)::

    k_cache, v_cache  float32 [n_blocks, n_kv_heads, block_size, head_dim]
    block_tables      int32   [n_seqs, max_blocks_per_seq]   # logical block j of sequence s -> physical block

A step holds T rows (tokens) from any number of sequences: row t belongs to sequence ``row_seq[t]`` at
position ``row_pos[t]``. Its K/V are written first (``kv_write``), then every row attends to positions
0..row_pos[t] of its own sequence, so prefill chunks and decode steps use the same code.
Scores, softmax (online: running max and sum) and the weighted sum are computed in float64 from the
float32 cache; query head h reads KV head h // (H / KVH).
"""
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


def attention(q, k_cache, v_cache, block_tables, row_seq, row_pos, out):
    """out[t, h] = softmax(q[t, h] . K[0..pos] / sqrt(hd)) V[0..pos]; q, out float [T, H, hd]."""
    T, H, hd = q.shape
    KVH = k_cache.shape[1]
    if H % KVH or k_cache.shape[3] != hd or out.shape != q.shape or v_cache.shape != k_cache.shape:
        raise ValueError(f"attention: q {q.shape}, cache {k_cache.shape}, out {out.shape} do not match")
    _check_rows(row_seq, row_pos, block_tables, k_cache.shape[2], T)
    _attention(q, k_cache, v_cache, block_tables, row_seq, row_pos, 1.0 / np.sqrt(hd), out)


@njit(**JIT_PARALLEL)
def _attention(q, k_cache, v_cache, block_tables, row_seq, row_pos, scale, out):
    T, H, hd = q.shape
    KVH = k_cache.shape[1]
    bs = k_cache.shape[2]
    group = H // KVH
    for i in prange(T * H):
        t = i // H
        h = i % H
        kvh = h // group
        table = block_tables[row_seq[t]]
        qv = q[t, h]
        acc = out[t, h]
        acc[:] = 0.0
        m = -np.inf
        l = 0.0
        for p in range(row_pos[t] + 1):
            blk = table[p // bs]
            off = p % bs
            kr = k_cache[blk, kvh, off]
            s = 0.0
            for d in range(hd):
                s += np.float64(qv[d]) * np.float64(kr[d])
            s *= scale
            if s > m:
                r = np.exp(m - s) if l > 0 else 0.0
                for d in range(hd):
                    acc[d] *= r
                l *= r
                m = s
            w = np.exp(s - m)
            l += w
            vr = v_cache[blk, kvh, off]
            for d in range(hd):
                acc[d] += w * vr[d]
        inv = 1.0 / l
        for d in range(hd):
            acc[d] *= inv
