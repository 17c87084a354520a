"""Causal GQA attention over a paged KV cache.

Cache layout of one layer (owned and allocated by ``bitnet_batch.engine.kv_cache``)::

    k_cache, v_cache  float32 or uint16 [n_kv_heads, n_blocks, block_size, head_dim]
    block_tables      int32   [n_seqs, max_blocks_per_seq]   # logical block j of sequence s -> physical block

KV head major: one KV head's rows of consecutive blocks are one run in memory, so a sequence whose blocks are
consecutive (the scheduler reserves a request's blocks at once) is read as one stream per KV head. Attention
at long contexts is bound by reading K/V, and short runs read slower: in the block-major layout every
16-position block was an 8 KB run 40 KB from the next (docs/performance-avx512.md).

A float32 cache holds K/V rounded to float32 (the BitNet spec's numerics). A uint16 cache holds IEEE
float16 bits (as llama.cpp / bitnet.cpp by default; half the memory): values are rounded to float32, then to
float16 (round half to even), values beyond +-65504 (infinities too) saturate to +-65504 and NaN is stored as a NaN
pattern. Reads widen the bits exactly (F16C conversions, or integer operations for the portable kernels), so
every stored value reads back exactly.

A step holds T rows (tokens) from any number of sequences: row t belongs to sequence ``row_seq[t]`` at
position ``row_pos[t]``. Its K/V are written first (``kv_write``), then every row attends to positions
0..row_pos[t] of its own sequence, so prefill chunks and decode steps use the same code.
Scores, softmax (two passes over a per-thread score buffer; exp is ``exp.exp_nonpositive``, a vectorised float64
exp within 2 ulp of numpy's) and the weighted sum are computed in float64 from the cache; query head h reads KV
head h // (H / KVH), and the query heads of one KV head are computed together so each K / V row is read once per
step (at 32 streams of the 2B4T shapes: 55 -> 45 ms per step; the vectorised exp then took ~8 ms more off, and
what is left, ~40 ms, is mostly the ~30 ms that reading ~0.5 GB of float32 K/V from memory takes).
Four query heads per KV head (the 2B4T shapes) take ``_attention_g4``, which shares each K/V element's widening
among the 4 heads, sums 4 positions per pass and prefetches rows across blocks; with a float16 cache it reads half
the bytes and widens each element with F16C under the SIMD kernels (32 streams of the 2B4T shapes, 30 layers:
~34 ms against ~41 for float32, and ~95 before it took float16 caches). Two query heads per KV head (the Qwen3
embedding model) take ``_attention_g2``, the same loops for 2 heads; both take sliding windows (Gemma3's layers).
"""
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload, register_jitable

from ._bounds import in_range, min_max
from ._config import JIT, JIT_CONTRACT, JIT_PARALLEL, serial
from ._cpu import KERNEL
from ._ir import prefetch_row
from .bits import f64_from_bits
from .buffers import aligned_zeros
from .exp import exp_nonpositive as _exp_nonpositive

_CACHE_DTYPES = (np.float32, np.uint16)
PREFETCH_ROWS = 8      # K/V rows ahead that _attention_g4 asks for (its reads cross blocks, which the hardware
                       # prefetcher does not follow)
_F16_TO_F64 = np.float64(2.0 ** 1008)


# ---- float16 storage -------------------------------------------------------------------------------------

@njit(**JIT)
def half_bits_row(src, dst, tmp):
    """dst uint16 [n] <- IEEE float16 bits of src (float [n]): rounded to float32 first, then to float16 half to
    even; overflow (and +-inf) saturates to +-65504, NaN -> 0x7e00. tmp: float32 [>= n] scratch. Integer
    operations on the float32 bits, selects instead of branches (vectorised)."""
    n = src.shape[0]
    for d in range(n):
        tmp[d] = np.float32(src[d])
    bits = tmp[:n].view(np.uint32)
    for d in range(n):
        b = bits[d]
        a = b & np.uint32(0x7FFFFFFF)
        # normal range: rebias the exponent (127 -> 15) and round the 13 dropped bits half to even; a carry
        # into the exponent is the right result
        h = (a - np.uint32(0x38000000) + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
        sub = np.uint32(np.rint(abs(tmp[d]) * np.float32(16777216.0)))     # below 2^-14: units of 2^-24, exact
        h = sub if a < np.uint32(0x38800000) else h
        h = np.uint32(0x7BFF) if a >= np.uint32(0x477FF000) else h          # >= 65520 would round to inf
        h = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else h           # NaN
        dst[d] = np.uint16(((b >> np.uint32(16)) & np.uint32(0x8000)) | h)


@njit(inline="always", **JIT)
def _half_bits_to_f64_portable(x):
    """float16 bits (uint16) -> float64 with integer operations: the sign and the exponent|mantissa bits shifted
    into float64's layout, times 2^1008 (exact for normal and subnormal halves); inf and NaN patterns (exponent
    all ones) give inf and NaN."""
    h = np.uint64(x)
    v = f64_from_bits(((h & np.uint64(0x8000)) << np.uint64(48)) | ((h & np.uint64(0x7FFF)) << np.uint64(42)))
    special = f64_from_bits(((h & np.uint64(0x8000)) << np.uint64(48)) | np.uint64(0x7FF0000000000000)
                            | ((h & np.uint64(0x3FF)) << np.uint64(42)))
    return special if (h & np.uint64(0x7C00)) == np.uint64(0x7C00) else v * _F16_TO_F64


@intrinsic
def _half_bits_to_f64_f16c(typingctx, x):
    """float16 bits (uint16) -> float64, exactly: LLVM's fpext (vcvtph2ps, vcvtps2pd: needs F16C)."""
    if x != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.DoubleType())
    return types.float64(types.uint16), codegen


def _to_f64(x):
    """A cache element as float64: a float32 value, or float16 bits (uint16) widened exactly (F16C conversions
    with the ``avx512`` and ``avx2`` kernels, integer operations with the ``portable`` ones; chosen when the
    caller compiles, so a kernel loaded from the JIT cache keeps its choice: both give the same values)."""


@overload(_to_f64, jit_options=dict(JIT))
def _to_f64_impl(x):
    if x == types.uint16:
        if KERNEL != "portable":
            return lambda x: _half_bits_to_f64_f16c(x)
        return lambda x: _half_bits_to_f64_portable(x)
    return lambda x: np.float64(x)


def _kv_row(cache, blk, h, off, buf):
    """The cache row of KV head h at (blk, off) as floats: a view of a float32 cache, or widened into buf (float64)."""


@overload(_kv_row, jit_options=dict(JIT))
def _kv_row_impl(cache, blk, h, off, buf):
    if cache.dtype == types.uint16:
        def widen(cache, blk, h, off, buf):
            row = cache[h, blk, off]
            for d in range(row.shape[0]):
                buf[d] = _to_f64(row[d])
            return buf
        return widen
    return lambda cache, blk, h, off, buf: cache[h, blk, off]


def _store_row(src, dst, buf):
    """dst (a cache row) <- src (float row), rounded to the cache's type; buf: a float64 scratch row (>= n / 2
    values), the float32 temporary of the float16 rounding."""


@overload(_store_row, jit_options=dict(JIT))
def _store_row_impl(src, dst, buf):
    if dst.dtype == types.uint16:
        def store_half(src, dst, buf):
            half_bits_row(src, dst, buf.view(np.float32))
        return store_half

    def store(src, dst, buf):
        for d in range(src.shape[0]):
            dst[d] = src[d]
    return store


# ---- kernels ---------------------------------------------------------------------------------------------


def _check_rows(row_seq, row_pos, block_tables, block_size, T) -> int:
    """Checks the rows' sequences and positions; returns the number of positions the longest row attends to."""
    if row_seq.shape[0] < T or row_pos.shape[0] < T:
        raise ValueError("attention: row_seq/row_pos shorter than the number of rows")
    if not in_range(row_seq, T, block_tables.shape[0]):
        raise ValueError("attention: row_seq out of range of block_tables")
    if T == 0:
        return 0
    lo, hi = min_max(row_pos, T)
    if lo < 0 or hi >= block_tables.shape[1] * block_size:
        raise ValueError("attention: position beyond the sequence's block table")
    return int(hi) + 1


def _check_cache(k_cache, v_cache, where):
    if k_cache.dtype not in _CACHE_DTYPES or v_cache.dtype != k_cache.dtype or v_cache.shape != k_cache.shape:
        raise ValueError(f"{where}: caches must be float32 or uint16 (float16 bits) of one shape, got "
                         f"{k_cache.dtype} {k_cache.shape} / {v_cache.dtype} {v_cache.shape}")


def kv_write(k, v, k_cache, v_cache, block_tables, row_seq, row_pos, scratch):
    """Store k, v (float32/float64 [T, KVH, hd]) of each row at its sequence position in the layer's cache,
    rounded to the cache's type (float32, or float16 bits in a uint16 cache). scratch: ``attention``'s
    (float64 [>= n_threads, >= hd]), a temporary row per worker thread for the float16 rounding."""
    T, _, hd = k.shape
    _check_cache(k_cache, v_cache, "kv_write")
    if k.shape != v.shape or k.shape[1:] != (k_cache.shape[0], k_cache.shape[3]):
        raise ValueError(f"kv_write: k {k.shape} / v {v.shape} do not match cache {k_cache.shape}")
    _check_rows(row_seq, row_pos, block_tables, k_cache.shape[2], T)
    if scratch.dtype != np.float64 or scratch.shape[0] < numba.config.NUMBA_NUM_THREADS or scratch.shape[1] < hd \
            or not scratch.flags.c_contiguous:
        raise ValueError(f"kv_write: scratch {scratch.shape} {scratch.dtype} must be C-contiguous float64 "
                         f"[>= {numba.config.NUMBA_NUM_THREADS}, >= {hd}]")
    if serial(k.size):
        _kv_write_serial(k, v, k_cache, v_cache, block_tables, row_seq, row_pos, scratch)
    else:
        _kv_write(k, v, k_cache, v_cache, block_tables, row_seq, row_pos, scratch)


@njit(inline="always", **JIT)
def _kv_write_row(k, v, k_cache, v_cache, block_tables, row_seq, row_pos, buf, t):
    bs = k_cache.shape[2]
    p = row_pos[t]
    blk = block_tables[row_seq[t], p // bs]
    off = p % bs
    for h in range(k.shape[1]):
        _store_row(k[t, h], k_cache[h, blk, off], buf)
        _store_row(v[t, h], v_cache[h, blk, off], buf)


@njit(**JIT_PARALLEL)
def _kv_write(k, v, k_cache, v_cache, block_tables, row_seq, row_pos, scratch):
    for t in prange(k.shape[0]):
        _kv_write_row(k, v, k_cache, v_cache, block_tables, row_seq, row_pos, scratch[numba.get_thread_id()], t)


@njit(**JIT)
def _kv_write_serial(k, v, k_cache, v_cache, block_tables, row_seq, row_pos, scratch):
    # scratch row 0, not numba.get_thread_id(): in a serial function it does not survive the on-disk JIT cache
    # (a second process crashed loading it)
    for t in range(k.shape[0]):
        _kv_write_row(k, v, k_cache, v_cache, block_tables, row_seq, row_pos, scratch[0], t)


@register_jitable
def grouped_kernel(group, block_size):
    """4 or 2 when ``group`` query heads per KV head over cache blocks of ``block_size`` positions take
    ``_attention_g4`` / ``_attention_g2`` (whose weighted sums step 4 positions within a block), else 0: the general
    ``_attention`` (plain Python, and callable from jitted code)."""
    return group if (group == 4 or group == 2) and block_size % 4 == 0 else 0


def attention_scratch(n_threads, max_pos, head_dim, group=1):
    """The per-thread scratch ``attention`` needs for ``group`` query heads per KV head: float64
    [n_threads, group * (max_pos + head_dim) + head_dim]."""
    return aligned_zeros((n_threads, group * (max_pos + head_dim) + head_dim), np.float64)


def attention(q, k_cache, v_cache, block_tables, row_seq, row_pos, out, scratch):
    """out[t, h] = softmax(q[t, h] . K[0..pos] / sqrt(hd)) V[0..pos]; q, out float [T, H, hd].

    Work is split over (row, KV head): the H / KVH query heads that share a KV head read each K and V row once.
    scratch float64 [>= n_threads, >= group * (max position + 1 + hd) + hd] (see ``attention_scratch``): one row
    per worker thread for the group's scores, contiguous copies of its queries and a widened K/V row (float16
    caches)."""
    T, H, hd = q.shape
    KVH = k_cache.shape[0]
    _check_cache(k_cache, v_cache, "attention")
    if H % KVH or k_cache.shape[3] != hd or out.shape != q.shape or v_cache.shape != k_cache.shape:
        raise ValueError(f"attention: q {q.shape}, cache {k_cache.shape}, out {out.shape} do not match")
    n_pos = _check_rows(row_seq, row_pos, block_tables, k_cache.shape[2], T)
    group = H // KVH
    need = group * (n_pos + hd) + hd
    if scratch.dtype != np.float64 or scratch.shape[0] < numba.config.NUMBA_NUM_THREADS or scratch.shape[1] < need:
        raise ValueError(f"attention: scratch {scratch.shape} {scratch.dtype} must be float64 "
                         f"[>= {numba.config.NUMBA_NUM_THREADS}, >= {need}]")
    _run(q, k_cache, v_cache, block_tables, row_seq, row_pos, 0, 1.0 / np.sqrt(hd), scratch, out)


def window_attention(q, k_cache, v_cache, block_tables, row_seq, row_pos, window, scale, out, scratch):
    """``attention`` with an explicit score scale and an optional sliding window, for the embedding models
    (``bitnet_batch.model.embedding_forward``): Gemma3's scale ``query_pre_attn_scalar ** -0.5`` and its
    sliding-window layers, where the row at position p attends to max(0, p - window + 1) .. p only (transformers
    ``sliding_window_overlay``: kv > q - W; ``window <= 0``: all of 0..p). q, out float64 [T, H, hd]; caches and
    scratch as ``attention``. The same numerics, and a row's result never depends on the other rows."""
    T, H, hd = q.shape
    KVH = k_cache.shape[0]
    _check_cache(k_cache, v_cache, "window_attention")
    if H % KVH or k_cache.shape[3] != hd or out.shape != q.shape:
        raise ValueError(f"window_attention: q {q.shape}, cache {k_cache.shape}, out {out.shape} do not match")
    if q.dtype != np.float64 or out.dtype != np.float64:
        raise TypeError(f"window_attention: q and out must be float64, got {q.dtype}, {out.dtype}")
    n_pos = _check_rows(row_seq, row_pos, block_tables, k_cache.shape[2], T)
    need = (H // KVH) * (n_pos + hd) + hd
    if scratch.dtype != np.float64 or scratch.shape[0] < numba.config.NUMBA_NUM_THREADS or scratch.shape[1] < need:
        raise ValueError(f"window_attention: scratch {scratch.shape} {scratch.dtype} must be float64 "
                         f"[>= {numba.config.NUMBA_NUM_THREADS}, >= {need}]")
    _run(q, k_cache, v_cache, block_tables, row_seq, row_pos, window, scale, scratch, out)


def _run(q, k_cache, v_cache, block_tables, row_seq, row_pos, window, scale, scratch, out):
    """The kernel for the shapes (``grouped_kernel``), called from Python (the compiled layer has ``_attend``)."""
    kernel = {4: _attention_g4, 2: _attention_g2}.get(grouped_kernel(q.shape[1] // k_cache.shape[0],
                                                                      k_cache.shape[2]), _attention)
    kernel(q, k_cache, v_cache, block_tables, row_seq, row_pos, np.int64(window), np.float64(scale), scratch, out)


@njit(inline="always", **JIT)
def _interleaved(j, T):
    """The j-th of T rows in the order 0, T-1, 1, T-2, ...: the prange's equal contiguous shares of tasks then
    hold as many early as late rows, and a prefill chunk's later rows attend to more positions (a 128-row
    chunk at position 896: 22.1 -> 19.3 ms with 2 threads, where one thread took the chunk's later half)."""
    return j // 2 if j % 2 == 0 else T - 1 - j // 2


@njit(inline="always", **JIT)
def _window_start(last, window):
    """The first position a row at position ``last`` attends to: 0, or with a sliding window (``window`` > 0) the
    window's first position."""
    return last - window + 1 if window > 0 and last - window + 1 > 0 else 0


@njit(inline="always", **JIT)
def _task(i, q, KVH, G, block_tables, row_seq, row_pos, window, scratch):
    """Task i of a step's (row, KV head) pairs (rows in ``_interleaved`` order): its row t, KV head, the row's block
    table, last and first positions and their count n, and this thread's scratch row, whose start holds the G
    heads' scores (head h0 + j at [j * n, j * n + n)) and then contiguous copies of their queries (filled here)."""
    T, hd = q.shape[0], q.shape[2]
    t = _interleaved(i // KVH, T)
    kvh = i % KVH
    last = row_pos[t]
    lo = _window_start(last, window)
    n = last + 1 - lo
    buf = scratch[numba.get_thread_id()]
    qv = buf[G * n:G * (n + hd)]
    _gather_queries(q, t, kvh * G, G, qv)
    return t, kvh, block_tables[row_seq[t]], last, lo, n, buf, buf[:G * n], qv


@njit(inline="always", **JIT)
def _gather_queries(q, t, h0, G, qv):
    """qv[j * hd:(j + 1) * hd] <- q[t, h0 + j] for the G query heads of one KV head (contiguous float64)."""
    hd = q.shape[2]
    for j in range(G):
        for d in range(hd):
            qv[j * hd + d] = q[t, h0 + j, d]


@njit(**JIT_CONTRACT)
def _softmax_numerators(seg):
    """One head's scores seg <- exp(score - max score); the 1 / sum is applied to its output at the end
    (``_divide_by_mass``). A slice, looped from 0: the loop vectorises (a range(lo, hi) index would not)."""
    m = -np.inf
    for p in range(seg.size):
        m = max(m, seg[p])
    for p in range(seg.size):
        seg[p] = _exp_nonpositive(seg[p] - m)


@njit(inline="always", **JIT)
def _divide_by_mass(seg, acc):
    """acc (one head's weighted sum of V rows) /= the sum of its softmax numerators seg (a slice: the sum
    vectorises)."""
    mass = 0.0
    for p in range(seg.size):
        mass += seg[p]
    inv = 1.0 / mass
    for d in range(acc.shape[0]):
        acc[d] *= inv


@njit(inline="always", **JIT)
def _softmax_heads(sc, n, G, out, t, h0):
    """Between the dots and the weighted sum of a task: the G heads' scores -> softmax numerators, their output
    rows out[t, h0 .. h0 + G) zeroed (the weighted sums' accumulators)."""
    for j in range(G):
        _softmax_numerators(sc[j * n:j * n + n])
        out[t, h0 + j, :] = 0.0


@njit(inline="always", **JIT)
def _normalize_heads(sc, n, G, out, t, h0):
    """After the weighted sum: each of the G heads' output rows divided by its softmax mass."""
    for j in range(G):
        _divide_by_mass(sc[j * n:j * n + n], out[t, h0 + j])


@njit(inline="always", **JIT)
def _v_block(v_cache, kvh, table, p, last, bs):
    """The grouped kernels' weighted sum at position p: the 4 V rows from p + PREFETCH_ROWS on (up to ``last``)
    asked for, and (the KV head's block holding p, p's offset in it)."""
    for ahead in range(p + PREFETCH_ROWS, min(p + PREFETCH_ROWS + 4, last + 1)):
        prefetch_row(v_cache[kvh, table[ahead // bs], ahead % bs])
    return v_cache[kvh, table[p // bs]], p % bs


@njit(**JIT_PARALLEL)
def _attention(q, k_cache, v_cache, block_tables, row_seq, row_pos, window, scale, scratch, out):
    """Row t attends to positions lo .. p = row_pos[t], lo = max(0, p - window + 1) (0 when window <= 0: the
    generative models; the embedding models' sliding-window layers pass their window)."""
    T, H, hd = q.shape
    KVH = k_cache.shape[0]
    bs = k_cache.shape[2]
    G = H // KVH
    for i in prange(T * KVH):
        t, kvh, table, last, lo, n, buf, sc, qv = _task(i, q, KVH, G, block_tables, row_seq, row_pos, window, scratch)
        h0 = kvh * G
        kvbuf = buf[G * (n + hd):G * (n + hd) + hd]   # a float16 cache row widened
        for i_p in range(n):
            p = lo + i_p
            kr = _kv_row(k_cache, table[p // bs], kvh, p % bs, kvbuf)
            for j in range(G):
                qj = qv[j * hd:(j + 1) * hd]
                s = 0.0
                for d in range(hd):
                    s += qj[d] * np.float64(kr[d])
                sc[j * n + i_p] = s * scale
        _softmax_heads(sc, n, G, out, t, h0)
        for i_p in range(n):
            p = lo + i_p
            vr = _kv_row(v_cache, table[p // bs], kvh, p % bs, kvbuf)
            for j in range(G):
                w = sc[j * n + i_p]
                acc = out[t, h0 + j]
                for d in range(hd):
                    acc[d] += w * np.float64(vr[d])
        _normalize_heads(sc, n, G, out, t, h0)


@njit(**JIT_PARALLEL)
def _attention_g4(q, k_cache, v_cache, block_tables, row_seq, row_pos, window, scale, scratch, out):
    """``_attention`` for 4 query heads per KV head (the 2B4T shapes, Gemma3's embedding models) over a float32 or
    float16 cache with blocks of a multiple of 4 positions: each K element is widened once for the 4 heads' dots,
    two positions' dots share each query load (32 streams at position 1000: ~8% less time; a prefill chunk's
    rows: 1-6%), and the weighted sum takes 4 positions of a block per pass over the 4 heads' output rows (a quarter
    of the loads and stores of the accumulators, the loop's limit), adding them in position order as the
    one-position loop does; K and V rows are prefetched ``PREFETCH_ROWS`` ahead. 32 streams at position ~96, 30
    layers, K/V streaming from memory: ~30% less time than ``_attention`` (60 -> 42 ms)."""
    T, H, hd = q.shape
    KVH = k_cache.shape[0]
    bs = k_cache.shape[2]
    for i in prange(T * KVH):
        t, kvh, table, last, lo, n, _, sc, qv = _task(i, q, KVH, 4, block_tables, row_seq, row_pos, window, scratch)
        h0 = kvh * 4
        q0, q1, q2, q3 = qv[:hd], qv[hd:2 * hd], qv[2 * hd:3 * hd], qv[3 * hd:]
        i_p = 0                                       # scores of positions lo + i_p
        while i_p + 2 <= n:                           # two positions per pass share the queries' loads
            p = lo + i_p
            for ahead in range(p + PREFETCH_ROWS, min(p + PREFETCH_ROWS + 2, last + 1)):
                prefetch_row(k_cache[kvh, table[ahead // bs], ahead % bs])
            ka = k_cache[kvh, table[p // bs], p % bs]
            kb = k_cache[kvh, table[(p + 1) // bs], (p + 1) % bs]
            s0 = s1 = s2 = s3 = 0.0
            u0 = u1 = u2 = u3 = 0.0
            for d in range(hd):
                x, y = _to_f64(ka[d]), _to_f64(kb[d])
                s0 += q0[d] * x
                s1 += q1[d] * x
                s2 += q2[d] * x
                s3 += q3[d] * x
                u0 += q0[d] * y
                u1 += q1[d] * y
                u2 += q2[d] * y
                u3 += q3[d] * y
            sc[i_p], sc[n + i_p], sc[2 * n + i_p], sc[3 * n + i_p] = s0 * scale, s1 * scale, s2 * scale, s3 * scale
            i_p += 1
            sc[i_p], sc[n + i_p], sc[2 * n + i_p], sc[3 * n + i_p] = u0 * scale, u1 * scale, u2 * scale, u3 * scale
            i_p += 1
        if i_p < n:
            p = lo + i_p
            kr = k_cache[kvh, table[p // bs], p % bs]
            s0 = s1 = s2 = s3 = 0.0
            for d in range(hd):
                kd = _to_f64(kr[d])
                s0 += q0[d] * kd
                s1 += q1[d] * kd
                s2 += q2[d] * kd
                s3 += q3[d] * kd
            sc[i_p], sc[n + i_p], sc[2 * n + i_p], sc[3 * n + i_p] = s0 * scale, s1 * scale, s2 * scale, s3 * scale
        _softmax_heads(sc, n, 4, out, t, h0)
        a0, a1, a2, a3 = out[t, h0], out[t, h0 + 1], out[t, h0 + 2], out[t, h0 + 3]
        i_p = 0
        while i_p < n:
            vb, off = _v_block(v_cache, kvh, table, lo + i_p, last, bs)
            if off % 4 == 0 and i_p + 4 <= n:         # 4 positions of one block (4 divides the block size)
                w00, w01, w02, w03 = sc[i_p], sc[i_p + 1], sc[i_p + 2], sc[i_p + 3]
                w10, w11, w12, w13 = sc[n + i_p], sc[n + i_p + 1], sc[n + i_p + 2], sc[n + i_p + 3]
                w20, w21, w22, w23 = sc[2 * n + i_p], sc[2 * n + i_p + 1], sc[2 * n + i_p + 2], sc[2 * n + i_p + 3]
                w30, w31, w32, w33 = sc[3 * n + i_p], sc[3 * n + i_p + 1], sc[3 * n + i_p + 2], sc[3 * n + i_p + 3]
                for d in range(hd):
                    x0, x1 = _to_f64(vb[off, d]), _to_f64(vb[off + 1, d])
                    x2, x3 = _to_f64(vb[off + 2, d]), _to_f64(vb[off + 3, d])
                    a0[d] = (((a0[d] + w00 * x0) + w01 * x1) + w02 * x2) + w03 * x3
                    a1[d] = (((a1[d] + w10 * x0) + w11 * x1) + w12 * x2) + w13 * x3
                    a2[d] = (((a2[d] + w20 * x0) + w21 * x1) + w22 * x2) + w23 * x3
                    a3[d] = (((a3[d] + w30 * x0) + w31 * x1) + w32 * x2) + w33 * x3
                i_p += 4
            else:
                w0, w1, w2, w3 = sc[i_p], sc[n + i_p], sc[2 * n + i_p], sc[3 * n + i_p]
                for d in range(hd):
                    x0 = _to_f64(vb[off, d])
                    a0[d] += w0 * x0
                    a1[d] += w1 * x0
                    a2[d] += w2 * x0
                    a3[d] += w3 * x0
                i_p += 1
        _normalize_heads(sc, n, 4, out, t, h0)


@njit(**JIT_PARALLEL)
def _attention_g2(q, k_cache, v_cache, block_tables, row_seq, row_pos, window, scale, scratch, out):
    """``_attention_g4`` for 2 query heads per KV head (BitNet-embedding-0.6B on Qwen3: 16 / 8): the dots take
    four positions per pass (eight sums, as ``_attention_g4``'s two positions of four heads), the weighted sum 4
    positions of a block per pass over the 2 heads' output rows. A 512-token text in the 0.6B shapes (16 / 8 heads
    of 128, 2 threads): 34.4 -> 22.9 ms against ``_attention`` (four positions per pass of the dots: 24.2 ms
    with two)."""
    T, H, hd = q.shape
    KVH = k_cache.shape[0]
    bs = k_cache.shape[2]
    for i in prange(T * KVH):
        t, kvh, table, last, lo, n, _, sc, qv = _task(i, q, KVH, 2, block_tables, row_seq, row_pos, window, scratch)
        h0 = kvh * 2
        q0, q1 = qv[:hd], qv[hd:]
        i_p = 0                                       # scores of positions lo + i_p
        while i_p + 4 <= n:                           # four positions per pass share the queries' loads
            p = lo + i_p
            for ahead in range(p + PREFETCH_ROWS, min(p + PREFETCH_ROWS + 4, last + 1)):
                prefetch_row(k_cache[kvh, table[ahead // bs], ahead % bs])
            ka = k_cache[kvh, table[p // bs], p % bs]
            kb = k_cache[kvh, table[(p + 1) // bs], (p + 1) % bs]
            kc = k_cache[kvh, table[(p + 2) // bs], (p + 2) % bs]
            kd = k_cache[kvh, table[(p + 3) // bs], (p + 3) % bs]
            s0 = s1 = s2 = s3 = 0.0
            u0 = u1 = u2 = u3 = 0.0
            for d in range(hd):
                x0, x1, x2, x3 = _to_f64(ka[d]), _to_f64(kb[d]), _to_f64(kc[d]), _to_f64(kd[d])
                s0 += q0[d] * x0
                s1 += q0[d] * x1
                s2 += q0[d] * x2
                s3 += q0[d] * x3
                u0 += q1[d] * x0
                u1 += q1[d] * x1
                u2 += q1[d] * x2
                u3 += q1[d] * x3
            sc[i_p], sc[i_p + 1], sc[i_p + 2], sc[i_p + 3] = s0 * scale, s1 * scale, s2 * scale, s3 * scale
            sc[n + i_p], sc[n + i_p + 1], sc[n + i_p + 2], sc[n + i_p + 3] = u0 * scale, u1 * scale, u2 * scale, \
                u3 * scale
            i_p += 4
        while i_p < n:
            p = lo + i_p
            kr = k_cache[kvh, table[p // bs], p % bs]
            s0 = s1 = 0.0
            for d in range(hd):
                x0 = _to_f64(kr[d])
                s0 += q0[d] * x0
                s1 += q1[d] * x0
            sc[i_p], sc[n + i_p] = s0 * scale, s1 * scale
            i_p += 1
        _softmax_heads(sc, n, 2, out, t, h0)
        a0, a1 = out[t, h0], out[t, h0 + 1]
        i_p = 0
        while i_p < n:
            vb, off = _v_block(v_cache, kvh, table, lo + i_p, last, bs)
            if off % 4 == 0 and i_p + 4 <= n:         # 4 positions of one block (4 divides the block size)
                w00, w01, w02, w03 = sc[i_p], sc[i_p + 1], sc[i_p + 2], sc[i_p + 3]
                w10, w11, w12, w13 = sc[n + i_p], sc[n + i_p + 1], sc[n + i_p + 2], sc[n + i_p + 3]
                for d in range(hd):
                    x0, x1 = _to_f64(vb[off, d]), _to_f64(vb[off + 1, d])
                    x2, x3 = _to_f64(vb[off + 2, d]), _to_f64(vb[off + 3, d])
                    a0[d] = (((a0[d] + w00 * x0) + w01 * x1) + w02 * x2) + w03 * x3
                    a1[d] = (((a1[d] + w10 * x0) + w11 * x1) + w12 * x2) + w13 * x3
                i_p += 4
            else:
                w0, w1 = sc[i_p], sc[n + i_p]
                for d in range(hd):
                    x0 = _to_f64(vb[off, d])
                    a0[d] += w0 * x0
                    a1[d] += w1 * x0
                i_p += 1
        _normalize_heads(sc, n, 2, out, t, h0)


@njit(inline="always", **JIT_PARALLEL)
def _attend(q, k_cache, v_cache, block_tables, row_seq, row_pos, window, scale, scratch, out):
    """The attention kernel for the shapes: ``_attention_g4`` / ``_attention_g2`` for 4 / 2 query heads per KV head
    (``grouped_kernel``), else ``_attention``."""
    G = q.shape[1] // k_cache.shape[0]
    g = grouped_kernel(G, k_cache.shape[2])
    if g == 4:
        _attention_g4(q, k_cache, v_cache, block_tables, row_seq, row_pos, window, scale, scratch, out)
    elif g == 2:
        _attention_g2(q, k_cache, v_cache, block_tables, row_seq, row_pos, window, scale, scratch, out)
    else:
        _attention(q, k_cache, v_cache, block_tables, row_seq, row_pos, window, scale, scratch, out)
