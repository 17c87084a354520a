"""One BitNet b1.58 layer of a step in a single compiled call (``bitnet_batch.model.bitnet.forward``'s loop body).

Called from Python, a layer is 14 kernel calls, each a Numba dispatch (~4 us) behind a wrapper that checks its
arguments (~3 us), plus two numpy residual adds; as one call, a one-stream 2B4T step takes 2-4 ms less (~50-57
ms; in-process A/B, same logits to the bit). ``bitnet_layer`` calls
the same private drivers in the same order, with the same serial / parallel choices (``serial_max``, the
limit of ``_config.serial``) and the same kernel family as the wrappers would, so its results are bit for bit
those of the wrapper sequence (``tests/test_engine.py`` runs both). Its arguments are checked once by
``check_layer``, not per call; the step's rows by the caller.

Per layer (float64 activations, the int8 quantizer fused with each RMSNorm, see ``ternary``)::

    q|k|v = ternary(int8(RMSNorm(x) * attn_norm))       one matmul for one row, else one per part
    RoPE(q), RoPE(k); K/V -> cache; a = attention(q, cache)
    x += W_o(int8(RMSNorm(a) * attn_sub_norm))
    gate|up = ternary(int8(RMSNorm(x) * ffn_norm)); gate = act(gate) * up
    x += W_down(int8(RMSNorm(gate) * ffn_sub_norm))

It is compiled with ``parallel=True`` (its residual add is a ``prange`` over rows above ``serial_max``): Numba
0.68 crashes the next process that loads from its cache a serial function calling the parallel drivers.
"""
import numba
import numpy as np
from numba import njit, prange
from numba.extending import overload

from . import activations, attention, rope, ternary
from ._config import JIT_PARALLEL
from ._cpu import HAS_AMX_INSTRUCTIONS, HAS_AVX2, HAS_AVX512, kernel_id


def _matmul(kernel, xq, xscale, xsum, packed, wscale, out):
    """``ternary.ternary_matmul``'s kernel call for the family ``kernel`` (``_cpu.kernel_id``)."""


_AMX, _AVX512, _AVX2 = kernel_id("amx"), kernel_id("avx512"), kernel_id("avx2")


def _matmul_amx(xq, xscale, xsum, packed, wscale, out):
    """``ternary._matmul_amx`` where the CPU has AMX, else the avx512 driver (a kernel id ``amx`` never reaches it
    there: ``_cpu`` offers the family only where it runs)."""


@overload(_matmul_amx, inline="always")
def _matmul_amx_impl(xq, xscale, xsum, packed, wscale, out):
    if HAS_AMX_INSTRUCTIONS:
        return lambda xq, xscale, xsum, packed, wscale, out: ternary._matmul_amx(xq, xscale, xsum, packed, wscale, out)
    return lambda xq, xscale, xsum, packed, wscale, out: ternary._matmul_avx512(xq, xscale, xsum, packed, wscale, out)


@overload(_matmul, inline="always")
def _matmul_impl(kernel, xq, xscale, xsum, packed, wscale, out):
    # which families the CPU runs is a CPU fact (part of Numba's cache key): a SIMD driver is only compiled where
    # it runs (its instructions would not even compile elsewhere)
    if HAS_AVX512:
        def three(kernel, xq, xscale, xsum, packed, wscale, out):
            if kernel == _AMX:
                _matmul_amx(xq, xscale, xsum, packed, wscale, out)
            elif kernel == _AVX512:
                ternary._matmul_avx512(xq, xscale, xsum, packed, wscale, out)
            elif kernel == _AVX2:
                ternary._matmul_avx2(xq, xscale, xsum, packed, wscale, out)
            else:
                ternary._matmul_portable(xq, xscale, xsum, packed, wscale, out)
        return three
    if HAS_AVX2:
        def two(kernel, xq, xscale, xsum, packed, wscale, out):
            if kernel == _AVX2:
                ternary._matmul_avx2(xq, xscale, xsum, packed, wscale, out)
            else:
                ternary._matmul_portable(xq, xscale, xsum, packed, wscale, out)
        return two
    return lambda kernel, xq, xscale, xsum, packed, wscale, out: ternary._matmul_portable(xq, xscale, xsum, packed,
                                                                                           wscale, out)


@njit(inline="always", **JIT_PARALLEL)
def _norm_quantize(x, w, eps, xq_flat, xscale, xsum, kp, serial_max):
    """int8(RMSNorm(x) * w) as a contiguous [T, kp] view of ``xq_flat`` (kp: the projection's padded input width;
    a wider row stride slows the matmul), its scales and sums in ``xscale`` / ``xsum``."""
    T = x.shape[0]
    xq = xq_flat[:T * kp].reshape((T, kp))
    if T * x.shape[1] <= serial_max:
        ternary._quantize_rows_serial(x, w, eps, xq, xscale, xsum)
    else:
        ternary._quantize_rows(x, w, eps, xq, xscale, xsum)
    return xq


@njit(inline="always", **JIT_PARALLEL)
def _part(flat, T, lo, n):
    """Part [lo, lo + n) of a fused projection's output: one C-contiguous [T, n] block of ``flat`` (its T-row
    layout), or for one row the columns [lo, lo + n) of the single [1, N] result."""
    if T == 1:
        return flat[lo:lo + n].reshape((1, n))
    return flat[T * lo:T * (lo + n)].reshape((T, n))


@njit(inline="always", **JIT_PARALLEL)
def _project_parts(kernel, xq, xscale, xsum, packed, scale, starts, sizes, flat):
    """A fused projection (q|k|v, gate|up) of the quantized rows: for one row one matmul over all its rows (the
    parts are column ranges of the [1, N] result, contiguous), else a matmul per part into its own C-contiguous
    [T, n] block of ``flat`` (column ranges of a [T, N] result would be strided: the row kernels that follow
    vectorise badly on them)."""
    T = xq.shape[0]
    if T == 1:
        _matmul(kernel, xq, xscale[:1], xsum[:1], packed, scale, flat[:scale.shape[0]].reshape((1, scale.shape[0])))
        return
    for i in range(len(starts)):
        lo, n = starts[i], sizes[i]
        _matmul(kernel, xq, xscale[:T], xsum[:T], packed[lo:lo + ternary.padded_rows(n)], scale[lo:lo + n],
                _part(flat, T, lo, n))


@njit(inline="always", **JIT_PARALLEL)
def _add_rows(x, y, serial_max):
    """x += y (the residual add), row-parallel above ``serial_max`` elements. Element loops, not ``x[t] += y[t]``:
    in a parallel function Numba turns that row expression into a parallel region of its own per row (32 rows of
    2560: 82 against 16 us)."""
    D = x.shape[1]
    if x.size <= serial_max:
        for t in range(x.shape[0]):
            for d in range(D):
                x[t, d] += y[t, d]
    else:
        for t in prange(x.shape[0]):
            for d in range(D):
                x[t, d] += y[t, d]


@njit(**JIT_PARALLEL)
def bitnet_layer(x, xq_flat, xscale, xsum, qkv_flat, att, proj, gu_flat, att_scratch,
                 attn_norm, qkv_packed, qkv_scale, qkv_starts, qkv_sizes, attn_sub_norm, wo_packed, wo_scale,
                 ffn_norm, gu_packed, gu_scale, gu_starts, gu_sizes, ffn_sub_norm, down_packed, down_scale,
                 k_cache, v_cache, block_tables, row_seq, row_pos, cos, sin,
                 eps, act, serial_max, kernel):
    """One layer over the step's T rows, in place on the residual stream x (float64 [T, D]); the other arrays
    are the workspace's buffers (flat or [>= T, ...]), the layer's weights (``qkv_starts`` / ``qkv_sizes``: the
    fused parts' first rows and sizes, int64), its KV cache and the RoPE table. ``eps`` float32, ``act``
    ``activations.RELU2`` / ``SILU``, ``kernel`` the ternary kernel family (``_cpu.kernel_id``)."""
    T = x.shape[0]
    H, hd = att.shape[1], att.shape[2]
    KVH = k_cache.shape[0]
    # q|k|v, RoPE, the cache, attention
    xq = _norm_quantize(x, attn_norm, eps, xq_flat, xscale, xsum, qkv_packed.shape[1] * 4, serial_max)
    _project_parts(kernel, xq, xscale, xsum, qkv_packed, qkv_scale, qkv_starts, qkv_sizes, qkv_flat)
    q = _part(qkv_flat, T, qkv_starts[0], qkv_sizes[0]).reshape((T, H, hd))
    k = _part(qkv_flat, T, qkv_starts[1], qkv_sizes[1]).reshape((T, KVH, hd))
    v = _part(qkv_flat, T, qkv_starts[2], qkv_sizes[2]).reshape((T, KVH, hd))
    for r in (q, k):
        if r.size <= serial_max:
            rope._rope_neox_serial(r, row_pos, cos, sin)
        else:
            rope._rope_neox(r, row_pos, cos, sin)
    if k.size <= serial_max:
        attention._kv_write_serial(k, v, k_cache, v_cache, block_tables, row_seq, row_pos, att_scratch)
    else:
        attention._kv_write(k, v, k_cache, v_cache, block_tables, row_seq, row_pos, att_scratch)
    a = att[:T]
    scale = 1.0 / np.sqrt(hd)
    attention._attend(q, k_cache, v_cache, block_tables, row_seq, row_pos, 0, scale, att_scratch, a)
    # x += W_o(int8(RMSNorm(a) * attn_sub_norm))
    p = proj[:T]
    xq = _norm_quantize(a.reshape((T, H * hd)), attn_sub_norm, eps, xq_flat, xscale, xsum, wo_packed.shape[1] * 4,
                        serial_max)
    _matmul(kernel, xq, xscale[:T], xsum[:T], wo_packed, wo_scale[:p.shape[1]], p)
    _add_rows(x, p, serial_max)
    # gate|up, act(gate) * up (in place in gate), x += W_down(int8(RMSNorm(gate) * ffn_sub_norm))
    xq = _norm_quantize(x, ffn_norm, eps, xq_flat, xscale, xsum, gu_packed.shape[1] * 4, serial_max)
    _project_parts(kernel, xq, xscale, xsum, gu_packed, gu_scale, gu_starts, gu_sizes, gu_flat)
    gate = _part(gu_flat, T, gu_starts[0], gu_sizes[0])
    up = _part(gu_flat, T, gu_starts[1], gu_sizes[1])
    if gate.size <= serial_max:
        activations._gated_serial(gate, up, act, gate)
    else:
        activations._gated(gate, up, act, gate)
    xq = _norm_quantize(gate, ffn_sub_norm, eps, xq_flat, xscale, xsum, down_packed.shape[1] * 4, serial_max)
    _matmul(kernel, xq, xscale[:T], xsum[:T], down_packed, down_scale[:p.shape[1]], p)
    _add_rows(x, p, serial_max)


def _need(ok, what):
    if not ok:
        raise ValueError(f"bitnet_layer: {what}")


def _c(a, dtype, ndim):
    return isinstance(a, np.ndarray) and a.dtype == dtype and a.ndim == ndim and a.flags.c_contiguous


def check_layer(max_rows, x, xq_flat, xscale, xsum, qkv_flat, att, proj, gu_flat, att_scratch,
                attn_norm, qkv_packed, qkv_scale, qkv_starts, qkv_sizes, attn_sub_norm, wo_packed, wo_scale,
                ffn_norm, gu_packed, gu_scale, gu_starts, gu_sizes, ffn_sub_norm, down_packed, down_scale,
                k_cache, v_cache, block_tables, cos, sin):
    """Check once what ``bitnet_layer`` takes for granted for steps of up to ``max_rows`` rows (x, xscale, xsum,
    att, proj: the workspace's full buffers); raises ValueError naming the first mismatch. Per step the caller
    checks the rows themselves (``check_rows``)."""
    D = x.shape[1] if x.ndim == 2 else -1
    _need(_c(x, np.float64, 2) and x.shape[0] >= max_rows, f"x {x.shape} {x.dtype}")
    _need(_c(att, np.float64, 3) and att.shape[0] >= max_rows and _c(proj, np.float64, 2)
          and proj.shape[0] >= max_rows and proj.shape[1] == D, f"att {att.shape} / proj {proj.shape}")
    H, hd = att.shape[1], att.shape[2]
    _need(xscale.dtype == np.float32 and xsum.dtype == np.int32 and xscale.shape[0] >= max_rows
          and xsum.shape[0] >= max_rows, "xscale / xsum")
    attention._check_cache(k_cache, v_cache, "bitnet_layer")
    _need(k_cache.ndim == 4 and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous and k_cache.shape[3] == hd
          and H % k_cache.shape[0] == 0, f"caches {k_cache.shape} for {H} heads of {hd}")
    KVH = k_cache.shape[0]
    _need(_c(block_tables, np.int32, 2), "block_tables")
    _need(cos.dtype == np.float32 and cos.ndim == 2 and sin.shape == cos.shape and 2 * cos.shape[1] <= hd,
          f"RoPE table {cos.shape}")
    _need(_c(att_scratch, np.float64, 2) and att_scratch.shape[0] >= numba.config.NUMBA_NUM_THREADS
          and att_scratch.shape[1] >= hd, "att_scratch")
    for name, w, n in (("attn_norm", attn_norm, D), ("attn_sub_norm", attn_sub_norm, H * hd),
                       ("ffn_norm", ffn_norm, D), ("ffn_sub_norm", ffn_sub_norm, gu_sizes[0])):
        _need(w.dtype == np.float32 and w.shape == (n,), f"{name} {w.shape} {w.dtype}, want ({n},)")
    widest = 0
    for name, packed, scale, k_in, parts in (
            ("qkv", qkv_packed, qkv_scale, D, (qkv_starts, qkv_sizes, (H * hd, KVH * hd, KVH * hd))),
            ("wo", wo_packed, wo_scale, H * hd, None), ("gate_up", gu_packed, gu_scale, D, (gu_starts, gu_sizes, None)),
            ("down", down_packed, down_scale, gu_sizes[0], None)):
        kp = packed.shape[1] * 4 if packed.ndim == 2 else -1
        _need(_c(packed, np.uint8, 2) and scale.dtype == np.float32 and scale.ndim == 1
              and packed.shape[0] == ternary.padded_rows(scale.shape[0]) and kp % ternary.BLOCK == 0
              and k_in <= kp <= ternary.MAX_K,
              f"{name} packed {packed.shape} / scale {scale.shape} for inputs of {k_in}")
        widest = max(widest, kp)
        if parts is None:
            _need(scale.shape[0] >= D, f"{name} has {scale.shape[0]} rows, want {D}")
            continue
        starts, sizes, want = parts
        _need(starts.dtype == np.int64 and sizes.dtype == np.int64 and starts.shape == sizes.shape
              and starts.shape[0] == (3 if want else 2) and np.all(starts % ternary.ROW_GROUP == 0)
              and np.all(starts + sizes <= scale.shape[0]) and (want is None or tuple(sizes) == want)
              and (want is not None or sizes[0] == sizes[1]), f"{name} parts {starts} / {sizes}")
        flat = qkv_flat if name == "qkv" else gu_flat
        _need(_c(flat, np.float64, 1) and flat.shape[0] >= max_rows * scale.shape[0],
              f"{name} output buffer of {flat.shape[0]} values")
    _need(_c(xq_flat, np.int8, 1) and xq_flat.shape[0] >= max_rows * widest, f"xq buffer of {xq_flat.shape[0]}")


def check_rows(T, row_seq, row_pos, block_tables, block_size, cos, att_scratch, group, hd):
    """The step's T rows (int32 ``row_seq`` / ``row_pos``) against the cache's block tables, the RoPE table and
    the attention's scratch (``group`` query heads per KV head of width ``hd``)."""
    _need(row_seq.dtype == np.int32 and row_pos.dtype == np.int32, "row_seq / row_pos must be int32")
    n_pos = attention._check_rows(row_seq, row_pos, block_tables, block_size, T)
    _need(n_pos <= cos.shape[0], f"position {n_pos - 1} beyond the RoPE table ({cos.shape[0]})")
    _need(att_scratch.shape[1] >= group * (n_pos + hd) + hd, f"att_scratch too small for position {n_pos - 1}")
