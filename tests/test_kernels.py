"""Every kernel against its plain-numpy twin (tests/naive.py), on several shapes."""
import contextlib
import json
import os
import subprocess
import sys

import numba
import numpy as np
import pytest

import naive
from bitnet_batch.model import quants
from bitnet_batch.model.layout import (deinterleave_rows, from_i2s_rows, interleave_rows, pack_kernel, padded,
                                       padded_rows, unpack_kernel)
from jit_kernels import _config, _cpu, activations, attention, buffers, embedding, norms, rope, ternary

RNG = np.random.default_rng(1234)
KERNELS = _cpu.available_kernels()       # ("amx", "avx512", "avx2", "portable") on a Xeon with AMX
# every kernel family of this build; those the CPU Numba compiles for cannot run are skipped, saying why
FAMILIES = [pytest.param(k, marks=pytest.mark.skipif(
    k not in KERNELS, reason=f"{k}: the CPU Numba compiles for lacks {'/'.join(f[1:] for f in _cpu.NEEDS[k])} "
                             f"(or the JIT is off)")) for k in _cpu.FAMILIES]


def _ternary(n, k):
    return RNG.integers(-1, 2, size=(n, k)).astype(np.int8)


def _view(a, extra=96):
    """A copy of ``a`` seen through a wider buffer (row stride > row width), the layout of the engine's
    workspace slices (``ws.xq[:T, :kp]``, column slices of fused outputs). Every matmul in these tests is
    called with views, so each kernel compiles once per output dtype."""
    buf = np.zeros((a.shape[0], a.shape[1] + extra), a.dtype)
    buf[:, :a.shape[1]] = a
    return buf[:, :a.shape[1]]


def _quantized(T, K, spread=1.0):
    """Random activations [T, K] -> (x, xq int8 view [T, padded(K)], xscale, xsum) via the kernel quantizer."""
    x = (RNG.standard_normal((T, K)) * spread).astype(np.float32)
    xq, s, sm = _view(np.zeros((T, padded(K)), np.int8)), np.zeros(T, np.float32), np.zeros(T, np.int32)
    ternary.quantize_rows(x, xq, s, sm)
    return x, xq, s, sm


def _matmul(xq, s, sm, packed, wscale, kernel, dtype=np.float64):
    out = _view(np.full((xq.shape[0], wscale.shape[0]), np.nan, dtype))
    ternary.ternary_matmul(xq, s, sm, packed, wscale, out, kernel=kernel)
    return out


# ---- activation quantization ------------------------------------------------------------------------------

# small T * K run serially, (40, 2000) through the parallel kernel
@pytest.mark.parametrize("T,K,dtype", [(1, 128, np.float32), (3, 256, np.float32), (7, 200, np.float64),
                                       (16, 640, np.float32), (2, 6912, np.float64), (40, 2000, np.float32)])
def test_quantize_rows(T, K, dtype):
    x = (RNG.standard_normal((T, K)) * RNG.uniform(0.01, 20, (T, 1))).astype(dtype)
    x[0, :3] = [0.5 / 127 * 3, -2.5 / 127 * 3, 0]         # exercise ties
    x[-1, 5] = 1e4                                         # an outlier row: most values quantize to 0
    kp = padded(K)
    xq = np.full((T, kp), 99, np.int8)
    s = np.zeros(T, np.float32)
    sm = np.zeros(T, np.int32)
    ternary.quantize_rows(x, xq, s, sm)
    q_ref, s_ref, sum_ref = naive.quantize_rows(x)
    np.testing.assert_array_equal(xq[:, :K], q_ref)
    assert (xq[:, K:] == 0).all()
    np.testing.assert_array_equal(s, s_ref)
    np.testing.assert_array_equal(sm, sum_ref)


@pytest.mark.parametrize("T", [1, 3, 70])              # serial and parallel drivers
def test_norm_quantize_rows_is_quantize_of_rmsnorm(T):
    K = 2560
    x = RNG.standard_normal((T, K)) * RNG.uniform(0.01, 20, (T, 1))
    w = RNG.uniform(0.2, 3.0, K).astype(np.float32)
    kp = padded(K) + 128
    xq, s, sm = np.full((T, kp), 99, np.int8), np.zeros(T, np.float32), np.zeros(T, np.int32)
    ternary.norm_quantize_rows(x, w, 1e-5, xq, s, sm)
    q_ref, s_ref, sum_ref = naive.quantize_rows(naive.rmsnorm(x, w, 1e-5))
    assert (xq[:, K:] == 0).all()
    # the float64 norm may differ from the twin's in its last bit, which can move a value across a rounding
    # tie: allow a handful of +-1 flips, nothing more
    diff = xq[:, :K].astype(int) - q_ref
    assert np.abs(diff).max() <= 1 and np.count_nonzero(diff) <= max(2, T * K // 100000)
    np.testing.assert_allclose(s, s_ref, rtol=1e-6)
    # and exactly what the unfused kernels give row by row
    normed = np.zeros_like(x)
    norms.rmsnorm(x, w, 1e-5, normed)
    xq2, s2, sm2 = np.zeros((T, kp), np.int8), np.zeros(T, np.float32), np.zeros(T, np.int32)
    ternary.quantize_rows(normed, xq2, s2, sm2)
    np.testing.assert_array_equal(xq, xq2)
    np.testing.assert_array_equal(s, s2)
    np.testing.assert_array_equal(sm, sm2)
    with pytest.raises(ValueError):
        ternary.norm_quantize_rows(x, w[:-1], 1e-5, xq, s, sm)


def test_quantize_zero_row_uses_floor():
    x = np.zeros((1, 128), np.float32)
    xq, s, sm = np.zeros((1, 128), np.int8), np.zeros(1, np.float32), np.zeros(1, np.int32)
    ternary.quantize_rows(x, xq, s, sm)
    assert s[0] == np.float32(127.0) / np.float32(1e-5) and (xq == 0).all()


# ---- ternary matmul: every kernel against the twin, bit for bit ---------------------------------------------

# T up to 40 (more than one 4-token tile, every 1..3 tail), N odd / below 4 / over one 64-row task,
# K not a multiple of 256 and past the 8-block int16 span (1152, 2100), K = 6912 with T = 40 (two token chunks)
SHAPES = [(1, 8, 128), (1, 37, 2560), (2, 5, 200), (3, 9, 300), (4, 17, 200), (5, 33, 256), (7, 64, 640),
          (9, 3, 1000), (13, 131, 1152), (40, 70, 384), (6, 2, 2100), (40, 9, 6912)]


@pytest.mark.parametrize("kernel", FAMILIES)
@pytest.mark.parametrize("T,N,K", SHAPES)
def test_ternary_matmul_matches_twin_exactly(kernel, T, N, K):
    t = _ternary(N, K)
    wscale = RNG.uniform(0.1, 2.0, N).astype(np.float32)
    x, xq, s, sm = _quantized(T, K, spread=RNG.uniform(0.1, 10))
    out = _matmul(xq, s, sm, pack_kernel(t), wscale, kernel)
    # integer dot exact, the same float64 epilogue acc / s * wscale: equal bits
    np.testing.assert_array_equal(out, naive.ternary_matmul(xq[:, :K], s, t, wscale))
    np.testing.assert_allclose(out, naive.bitlinear(x, t, wscale), rtol=1e-5, atol=1e-5)


def _at(a, offset):
    """A copy of ``a`` whose first byte sits ``offset`` bytes past a cache line."""
    raw = np.empty(a.nbytes + 128, np.uint8)
    start = -raw.ctypes.data % buffers.CACHE_LINE + offset
    b = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    b[...] = a
    return b


@pytest.mark.parametrize("kernel", FAMILIES)
def test_ternary_matmul_gives_the_same_bits_at_any_alignment(kernel):
    """The AVX2 tiles read activations as memory operands at offsets 32j of each block: whatever the buffers'
    alignment (the engine's are cache-line aligned, a caller's need not be), the products are the twin's."""
    N, K, T = 10, 640, 9
    t, wscale = _ternary(N, K), RNG.uniform(0.1, 2.0, N).astype(np.float32)
    _, xq, s, sm = _quantized(T, K)
    want = naive.ternary_matmul(xq, s, t, wscale)
    packed = pack_kernel(t)
    for xo, po in ((0, 0), (16, 16), (32, 0), (48, 32), (1, 7), (63, 48)):
        np.testing.assert_array_equal(_matmul(_at(np.ascontiguousarray(xq), xo), s, sm, _at(packed, po), wscale,
                                              kernel), want, err_msg=f"xq +{xo}, packed +{po}")


@pytest.mark.parametrize("shape,dtype", [((3, 5), np.float64), (1000, np.int8), ((2, 3, 4), np.float32),
                                               (300_003, np.uint16)])
def test_aligned_buffers(shape, dtype):
    for make in (buffers.aligned_empty, buffers.aligned_zeros):
        a = make(shape, dtype)
        assert a.shape == (shape if isinstance(shape, tuple) else (shape,)) and a.dtype == dtype
        assert a.flags.c_contiguous and a.ctypes.data % buffers.CACHE_LINE == 0
    assert not buffers.aligned_zeros(shape, dtype).any()


@pytest.mark.parametrize("kernel", FAMILIES)
def test_float32_output_is_the_float64_result_rounded_once(kernel):
    N, K, T = 19, 640, 6
    t, wscale = _ternary(N, K), RNG.uniform(0.1, 2.0, N).astype(np.float32)
    _, xq, s, sm = _quantized(T, K)
    out32 = _matmul(xq, s, sm, pack_kernel(t), wscale, kernel, np.float32)
    assert out32.dtype == np.float32
    np.testing.assert_array_equal(out32, naive.ternary_matmul(xq, s, t, wscale).astype(np.float32))


@pytest.mark.parametrize("kernel", FAMILIES)
def test_extreme_activations_and_code_3_do_not_overflow(kernel):
    """Worst case for the int16 partial sums: every code 3 (bytes 0xFF, possible in a raw I2_S payload;
    multiplied as 3 like bitnet.cpp's dot) against -128 everywhere, and random bytes against +-128."""
    N, K, T = 6, 6912, 3
    rows = RNG.integers(0, 256, size=(N, K // 4)).astype(np.uint8)
    rows[0] = 0xFF
    rows[1] = 0xAA                                                 # all code 2 (+1)
    packed = interleave_rows(rows)
    xq = RNG.choice(np.array([-128, 127], np.int8), size=(T, K))
    xq[0] = -128
    xq = _view(xq)
    s = np.array([1.0, 0.5, 3.0], np.float32)
    sm = xq.astype(np.int32).sum(axis=1).astype(np.int32)
    wscale = np.ones(N, np.float32)
    codes = np.concatenate([(rows.reshape(N, -1, 1, 32) >> sh) & 3 for sh in (6, 4, 2, 0)], axis=2)
    dot = xq.astype(np.int64) @ codes.reshape(N, K).astype(np.int64).T - sm[:, None]
    out = _matmul(xq, s, sm, packed, wscale, kernel)
    np.testing.assert_array_equal(out, dot / s.astype(np.float64)[:, None])
    assert out[0, 0] == -128 * 2 * K                                # 3 * -128 - (-128) per input


def test_rows_are_bit_identical_whatever_the_batch_kernel_or_threads():
    N, K, T = 67, 640, 40
    t, wscale = _ternary(N, K), RNG.uniform(0.5, 2.0, N).astype(np.float32)   # float64 out, as the engine
    _, xq, s, sm = _quantized(T, K)
    packed = pack_kernel(t)
    full = {k: _matmul(xq, s, sm, packed, wscale, k) for k in KERNELS}
    ref = full[KERNELS[0]]
    for k in KERNELS:
        np.testing.assert_array_equal(full[k], ref)                # AVX2 == portable, bit for bit
        for n_rows in range(1, T + 1):                             # every batch size (tile tails differ)
            np.testing.assert_array_equal(_matmul(xq[:n_rows], s, sm, packed, wscale, k), ref[:n_rows])
        rows = [31, 2, 17]                                         # rows in another order and company
        np.testing.assert_array_equal(_matmul(_view(xq[rows]), s[rows], sm[rows], packed, wscale, k), ref[rows])
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        for k in KERNELS:
            np.testing.assert_array_equal(_matmul(xq, s, sm, packed, wscale, k), ref)
    finally:
        numba.set_num_threads(threads)


@pytest.mark.parametrize("kernel", FAMILIES)
def test_ternary_matmul_writes_only_its_view(kernel):
    """Fused projections are column slices of one output (qkv): the kernel writes exactly its columns, with
    any row strides, and reads weight rows from a slice of whole row groups of a larger matrix (the last
    group partly used: N = 21 of its 22 rows)."""
    N, K, T = 21, 256, 6
    t, wscale = _ternary(N + 8, K), RNG.uniform(0.5, 2.0, N + 8).astype(np.float32)
    _, xq, s, sm = _quantized(T, K)
    big_out = np.zeros((T, N + 30), np.float64)
    packed = pack_kernel(t)
    ternary.ternary_matmul(xq, s, sm, packed[4:4 + 22], wscale[4:4 + N], big_out[:, 10:10 + N], kernel=kernel)
    np.testing.assert_array_equal(big_out[:, 10:10 + N], naive.ternary_matmul(xq, s, t[4:4 + N], wscale[4:4 + N]))
    assert (big_out[:, :10] == 0).all() and (big_out[:, 10 + N:] == 0).all()


AMX = pytest.mark.skipif("amx" not in KERNELS, reason=f"amx: the CPU Numba compiles for lacks AMX-TILE/AMX-INT8 "
                                                     f"or the OS refused the tile state ({_cpu.AMX_REFUSED})")


@AMX
@pytest.mark.parametrize("T,N,K", [(16, 16, 128), (17, 64, 256), (31, 48, 384), (32, 130, 640), (33, 80, 2560),
                                   (48, 200, 128), (100, 64, 1152), (129, 35, 256)])
def test_amx_tiles_match_the_twin_and_avx512(T, N, K):
    """Every tile combination of the AMX kernel (2 x 2, 2 x 1, 1 x 4, 1 x 2, 1 x 1; a last token tile of 1..16
    rows; weight rows past the last whole 16 (N = 130, 35) on the avx512 tiles), strided views, both output
    types: the twin's bits and avx512's."""
    t = _ternary(N, K)
    wscale = RNG.uniform(0.1, 2.0, N).astype(np.float32)
    _, xq, s, sm = _quantized(T, K, spread=RNG.uniform(0.1, 10))
    packed = pack_kernel(t)
    want = naive.ternary_matmul(xq[:, :K], s, t, wscale)
    for dtype in (np.float64, np.float32):
        out = _matmul(xq, s, sm, packed, wscale, "amx", dtype)
        np.testing.assert_array_equal(out, want.astype(dtype))
        np.testing.assert_array_equal(out, _matmul(xq, s, sm, packed, wscale, "avx512", dtype))


def test_transpose_plans_transpose():
    """The shuffle plans of the AMX kernels, applied with numpy: the unpacking's 8 row-group vectors -> one vector
    per dword q over the 16 rows (3 rounds of 8 shuffles), and the screen's 16 x 16 C tile -> its columns (4 rounds
    of 16); every shuffle takes two sources."""
    from jit_kernels import lm_head_int8, ternary_amx

    def apply(plan, vecs):
        rounds, by_col = plan
        for ops in rounds:
            assert all(len(idx) == 16 and 0 <= min(idx) and max(idx) < 32 for _, _, idx in ops)
            vecs = [np.concatenate([vecs[x], vecs[y]])[idx] for x, y, idx in ops]
        return [vecs[i] for i in by_col]

    groups = [np.array([100 * g + 10 * r + q for r in range(2) for q in range(8)]) for g in range(8)]
    out = apply(ternary_amx._TRANSPOSE, groups)
    assert len(ternary_amx._TRANSPOSE[0]) == 3
    for q in range(8):
        np.testing.assert_array_equal(out[q], [100 * g + 10 * r + q for g in range(8) for r in range(2)])
    tile = [np.arange(16) + 100 * a for a in range(16)]
    out = apply(lm_head_int8._TRANSPOSE16, tile)
    assert len(lm_head_int8._TRANSPOSE16[0]) == 4
    for c in range(16):
        np.testing.assert_array_equal(out[c], np.arange(16) * 100 + c)


@AMX
def test_amx_epilogue_divides_exactly_without_a_division():
    """The AMX epilogue computes (dot - xsum) / xscale with FMA corrections of a product by 1 / xscale: correctly
    rounded for any float32 scale and int32 difference, as IEEE division. Scales over 2^-60 .. 2^60 with random
    and all-ones mantissas, differences up to +-2^31 (dots of code 3 against -128 and 127)."""
    N, K, T = 16, 128, 16 * 40
    rows = RNG.integers(0, 256, size=(N, K // 4)).astype(np.uint8)
    rows[:4] = 0xFF
    packed = interleave_rows(rows)
    xq = RNG.integers(-128, 128, size=(T, K)).astype(np.int8)
    xq[::3] = RNG.choice(np.array([-128, 127], np.int8), size=(len(xq[::3]), K))
    xq = _view(xq)
    sm = RNG.integers(-2 ** 31 + 2 ** 17, 2 ** 31 - 2 ** 17, T).astype(np.int32)      # any difference dot - xsum
    mant = np.where(RNG.random(T) < 0.3, np.float32(2 - 2 ** -23), RNG.uniform(1, 2, T).astype(np.float32))
    s = (mant * np.exp2(RNG.integers(-60, 61, T))).astype(np.float32)
    wscale = RNG.uniform(0.1, 2.0, N).astype(np.float32)
    codes = np.concatenate([(rows.reshape(N, -1, 1, 32) >> sh) & 3 for sh in (6, 4, 2, 0)], axis=2)
    dot = xq.astype(np.int64) @ codes.reshape(N, K).astype(np.int64).T - sm[:, None]
    want = dot.astype(np.float64) / s.astype(np.float64)[:, None] * wscale.astype(np.float64)
    np.testing.assert_array_equal(_matmul(xq, s, sm, packed, wscale, "amx"), want)


def test_ternary_matmul_rejects_bad_arguments():
    p = pack_kernel(_ternary(6, 300))
    args = (np.ones(1, np.float32), np.zeros(1, np.int32), p, np.ones(6, np.float32), np.zeros((1, 6), np.float32))
    with pytest.raises(ValueError, match="multiple of 128"):
        ternary.ternary_matmul(np.zeros((1, 100), np.int8), *args)
    with pytest.raises(TypeError, match="int8"):
        ternary.ternary_matmul(np.zeros((1, 384), np.int16), *args)
    with pytest.raises(ValueError, match="kernel must be"):
        ternary.ternary_matmul(np.zeros((1, 384), np.int8), *args, kernel="sse9")
    with pytest.raises(ValueError, match="contiguous"):
        ternary.ternary_matmul(np.zeros((1, 768), np.int8)[:, ::2], *args)
    with pytest.raises(ValueError, match="rows of xq and out must be contiguous"):    # avx512 stores 8 at once
        ternary.ternary_matmul(np.zeros((1, 384), np.int8), *args[:4], np.zeros((1, 12), np.float32)[:, ::2])
    with pytest.raises(ValueError, match="C-contiguous"):          # rows of a wider matrix: not whole groups
        ternary.ternary_matmul(np.zeros((1, 384), np.int8), args[0], args[1],
                               np.zeros((6, 192), np.uint8)[:, :96], *args[3:])
    with pytest.raises(ValueError, match="groups of 2"):
        ternary.ternary_matmul(np.zeros((1, 384), np.int8), args[0], args[1], p[:4], *args[3:])
    with pytest.raises(ValueError, match="do not match"):
        ternary.ternary_matmul(np.zeros((2, 384), np.int8), *args)


# ---- kernel selection and the JIT cache -------------------------------------------------------------------

ALL = ("amx", "avx512", "avx2", "portable")
REFUSED = "the kernel refused the AMX tile state (arch_prctl(ARCH_REQ_XCOMP_PERM): Invalid argument)"


def test_select_kernel():
    assert _cpu.select_kernel("auto", ALL) == "amx"
    assert _cpu.select_kernel("auto", ALL[1:]) == "avx512"
    assert _cpu.select_kernel("auto", ALL[2:]) == "avx2"
    assert _cpu.select_kernel("auto", ("portable",)) == "portable"
    assert _cpu.select_kernel("", ("portable",)) == "portable"
    assert _cpu.select_kernel(" Portable ", ALL) == "portable"
    assert _cpu.select_kernel("avx2", ALL) == "avx2"
    assert _cpu.select_kernel("AVX512", ALL) == "avx512"
    assert _cpu.select_kernel("amx", ALL) == "amx"
    with pytest.raises(ValueError, match="avx512 but the CPU Numba compiles for lacks AVX2/FMA/F16C/AVX512F/"
                                         "AVX512BW/AVX512VL/AVX512VNNI .*use auto or one of avx2, portable"):
        _cpu.select_kernel("avx512", ALL[2:])
    with pytest.raises(ValueError, match="lacks AVX2/FMA/F16C "):
        _cpu.select_kernel("avx2", ("portable",))
    with pytest.raises(ValueError, match="amx but the CPU Numba compiles for lacks .*/AMX-TILE/AMX-INT8 .*use auto "
                                         "or one of avx512, avx2, portable"):
        _cpu.select_kernel("amx", ALL[1:])
    # a CPU with AMX whose OS refused the tile state: the error says so, auto takes the next family
    with pytest.raises(ValueError, match=r"amx but the kernel refused the AMX tile state \(arch_prctl"):
        _cpu.select_kernel("amx", ALL[1:], amx_refused=REFUSED)
    assert _cpu.select_kernel("auto", ALL[1:], amx_refused=REFUSED) == "avx512"
    with pytest.raises(ValueError, match="BITNET_BATCH_KERNEL must be one of auto, amx, avx512, avx2, portable, "
                                         "got 'neon'"):
        _cpu.select_kernel("neon", ALL)
    assert ternary.KERNEL == _cpu.KERNEL == _cpu.select_kernel(os.environ.get(_cpu.KERNEL_ENV, "auto"), KERNELS,
                                                               _cpu.AMX_REFUSED)


def test_runnable_families_follow_the_cpu_features_and_the_tile_permission():
    avx2 = {"+avx2", "+fma", "+f16c", "+sse4.2"}
    vnni = avx2 | {"+avx512f", "+avx512bw", "+avx512vl", "+avx512vnni"}
    amx = vnni | {"+amx-tile", "+amx-int8"}
    assert _cpu.runnable(amx) == ALL
    assert _cpu.runnable(amx, amx_refused=REFUSED) == ALL[1:]                   # the OS said no: avx512
    assert _cpu.runnable(amx - {"+amx-int8"}) == ALL[1:]                        # AMX-BF16 only
    assert _cpu.runnable(vnni) == ALL[1:]
    assert _cpu.runnable(vnni - {"+avx512vnni"} | {"-avx512vnni"}) == ("avx2", "portable")   # Skylake-SP
    assert _cpu.runnable(avx2) == ("avx2", "portable")
    assert _cpu.runnable(avx2 - {"+f16c"}) == ("portable",)
    assert _cpu.runnable(amx, jit=False) == ("portable",)                                   # NUMBA_DISABLE_JIT
    assert _cpu.AVAILABLE == _cpu.runnable(_cpu.cpu_features(), not numba.config.DISABLE_JIT, _cpu.AMX_REFUSED)
    assert [_cpu.kernel_id(k) for k in ALL] == [0, 1, 2, 3] and _cpu.FAMILIES == ALL
    assert [_cpu.simd_family(k) for k in ALL] == ["avx512", "avx512", "avx2", "portable"]


def test_request_amx_asks_linux_for_the_tile_state(monkeypatch):
    """``request_amx`` calls arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) and reports a refusal (or a
    platform without it) as a reason instead of raising."""
    calls = []

    class Libc:
        def syscall(self, *args):
            calls.append(args)
            return rc

    monkeypatch.setattr(_cpu.sys, "platform", "linux")
    monkeypatch.setattr(_cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(_cpu.ctypes, "CDLL", lambda *a, **k: Libc())
    monkeypatch.setattr(_cpu.ctypes, "get_errno", lambda: 22)
    rc = 0
    assert _cpu.request_amx() is None and calls == [(158, 0x1023, 18)]
    rc = -1
    assert _cpu.request_amx() == ("the kernel refused the AMX tile state (arch_prctl(ARCH_REQ_XCOMP_PERM): "
                                  "Invalid argument)")
    monkeypatch.setattr(_cpu.sys, "platform", "darwin")
    assert "only requested on Linux x86-64" in _cpu.request_amx()


def _features_without(*names):
    """NUMBA_CPU_FEATURES for this host with ``names`` turned off (a child then sees a CPU without them)."""
    from numba.core.codegen import get_host_cpu_features
    feats = get_host_cpu_features().split(",")
    return ",".join(f"-{f[1:]}" if f[1:] in names else f for f in feats)


@pytest.mark.parametrize("env,want", [
    ({_cpu.KERNEL_ENV: "auto", "NUMBA_CPU_FEATURES": _features_without("avx512vnni")},
     _cpu.runnable(set(_features_without("avx512vnni").split(",")))[0]),          # avx2 on an AVX2 CPU
    ({_cpu.KERNEL_ENV: "avx512", "NUMBA_CPU_FEATURES": _features_without("avx512vnni")},
     "BITNET_BATCH_KERNEL=avx512 but the CPU Numba compiles for lacks"),
    ({_cpu.KERNEL_ENV: "avx2", "NUMBA_CPU_FEATURES": _features_without("avx2", "fma")},
     "BITNET_BATCH_KERNEL=avx2 but the CPU Numba compiles for lacks AVX2/FMA/F16C"),
    ({_cpu.KERNEL_ENV: "amx", "NUMBA_CPU_FEATURES": _features_without("amx-int8")},
     "BITNET_BATCH_KERNEL=amx but the CPU Numba compiles for lacks"),
    ({_cpu.KERNEL_ENV: "avx2", "NUMBA_DISABLE_JIT": "1"}, "BITNET_BATCH_KERNEL=avx2 but"),
    ({_cpu.KERNEL_ENV: "auto", "NUMBA_DISABLE_JIT": "1"}, "portable"),
])
def test_forced_kernel_the_cpu_lacks_is_a_clear_error(env, want):
    """What a process picks from its CPU's features (here a child that sees this host with some turned off):
    the best family it has, or for a forced family it lacks an error naming what is missing."""
    res = _child("from jit_kernels import _cpu; print(_cpu.KERNEL)", env)
    if want in ALL:
        assert res.returncode == 0 and res.stdout.split() == [want], res.stderr[-2000:]
    else:
        assert res.returncode != 0 and want in res.stderr and "Traceback" in res.stderr
        assert "Fatal Python error" not in res.stderr and "Illegal instruction" not in res.stderr


CACHE_CHILD = """
import json, numpy as np
from jit_kernels import ternary
xq = np.ones((5, 384), np.int8)[:, :256]              # views, as in the engine (and the tests above)
s, sm = np.ones(5, np.float32), np.full(5, 256, np.int32)
out = np.zeros((5, 8), np.float32)[:, :3]
ternary.ternary_matmul(xq, s, sm, np.full((4, 64), 0xAA, np.uint8), np.ones(3, np.float32), out)
fn = {"amx": ternary._matmul_amx, "avx512": ternary._matmul_avx512, "avx2": ternary._matmul_avx2,
      "portable": ternary._matmul_portable}[ternary.KERNEL]
print(json.dumps({"kernel": ternary.KERNEL, "out": out.tolist(),
                  "hits": sum(fn.stats.cache_hits.values()), "misses": sum(fn.stats.cache_misses.values())}))
"""


def _child(code, env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_env_var_forces_the_kernel_and_a_second_process_loads_it_from_cache():
    for kernel in KERNELS:
        # this process compiles the child's call (or finds it in the cache): the child must only load it
        xq, s, sm = np.ones((5, 384), np.int8)[:, :256], np.ones(5, np.float32), np.full(5, 256, np.int32)
        out = np.zeros((5, 8), np.float32)[:, :3]
        ternary.ternary_matmul(xq, s, sm, np.full((4, 64), 0xAA, np.uint8), np.ones(3, np.float32), out,
                               kernel=kernel)
        res = _child(CACHE_CHILD, {_cpu.KERNEL_ENV: kernel})
        assert res.returncode == 0, res.stderr
        info = json.loads(res.stdout.strip().splitlines()[-1])
        assert info["kernel"] == kernel
        assert info["out"] == [[256.0] * 3] * 5                    # weights +1, x = 1: (2 * 256 - 256) / 1 * 1
        assert info["misses"] == 0 and info["hits"] == 1, info
    bad = _child("import jit_kernels.ternary", {_cpu.KERNEL_ENV: "fastest"})
    assert bad.returncode != 0 and "BITNET_BATCH_KERNEL must be one of" in bad.stderr


KV_CHILD = """
import numba, numpy as np
from jit_kernels import attention
k = np.linspace(-3, 3, 2 * 2 * 8).reshape(2, 2, 8)
for dtype in (np.float32, np.uint16):
    kc, vc = np.zeros((2, 2, 4, 8), dtype), np.zeros((2, 2, 4, 8), dtype)
    scratch = attention.attention_scratch(numba.config.NUMBA_NUM_THREADS, 4, 8)
    attention.kv_write(k, k, kc, vc, np.array([[0], [1]], np.int32), np.array([0, 1], np.int32),
                       np.array([1, 2], np.int32), scratch)
    print(kc.tolist())
"""


def test_kv_write_runs_from_the_jit_cache_in_a_second_process():
    """The serial KV write once crashed when a second process loaded it from the on-disk cache."""
    first = _child(KV_CHILD, {})
    second = _child(KV_CHILD, {})
    assert first.returncode == 0 and second.returncode == 0, (first.stderr[-2000:], second.stderr[-2000:])
    assert first.stdout == second.stdout and first.stdout.count("\n") == 2


NOJIT_CHILD = """
import json, numpy as np
from jit_kernels import ternary
rng = np.random.default_rng(5)
x = rng.standard_normal((3, 256)) * 4
w = rng.standard_normal(256).astype(np.float32)
packed = rng.integers(0, 256, (6, 64)).astype(np.uint8) & 0xAA | 0x11
res = {}
for name, norm in (("plain", None), ("normed", w)):
    xq, s, sm = np.zeros((3, 256), np.int8), np.zeros(3, np.float32), np.zeros(3, np.int32)
    if norm is None:
        ternary.quantize_rows(x, xq, s, sm)
    else:
        ternary.norm_quantize_rows(x, norm, 1e-5, xq, s, sm)
    out = np.zeros((3, 6))
    ternary.ternary_matmul(xq, s, sm, packed, np.full(6, 0.5, np.float32), out, kernel="portable")
    res[name] = [xq.tolist(), s.tolist(), sm.tolist(), out.tolist()]
from jit_kernels import sampling
v = (rng.standard_normal(3000) * 20).astype(np.float32)
v[::7] = -np.inf
wts = np.zeros(3000, np.float32)
total = sampling.exp_weights(v, v.max(), wts)
res["exp"] = [wts.tolist(), total]
res["top_n"] = [sampling.top_n(v, n).tolist() for n in (1, 5, 40, 200)]
print(json.dumps(res))
"""


def test_portable_path_runs_without_the_jit_and_gives_the_same_bits():
    """``NUMBA_DISABLE_JIT=1`` (debugging, CPUs Numba cannot compile for) runs the plain Python bodies of the
    quantizer's helpers and the portable matmul: same int8 rows, scales and outputs as the compiled code; the
    sampler's top-n ids and exp weights too (those within 1 ulp)."""
    jit = _child(NOJIT_CHILD, {})
    nojit = _child(NOJIT_CHILD, {"NUMBA_DISABLE_JIT": "1", _cpu.KERNEL_ENV: "auto"})    # even if a run forces one
    assert jit.returncode == 0 and nojit.returncode == 0, (jit.stderr[-2000:], nojit.stderr[-2000:])
    a, b = json.loads(jit.stdout), json.loads(nojit.stdout)
    (wa, ta), (wb, tb) = a.pop("exp"), b.pop("exp")      # the compiled exp fuses multiply-adds: <= 1 ulp apart
    np.testing.assert_array_max_ulp(np.float32(wa), np.float32(wb), maxulp=1)
    assert ta == pytest.approx(tb, rel=1e-6) and np.count_nonzero(wa) > 2000
    assert a == b
    assert any(v != 0 for v in np.ravel(a["normed"][0]))


# ---- layout ----------------------------------------------------------------------------------------------

def test_pack_kernel_roundtrip():
    t = _ternary(6, 300)
    p = pack_kernel(t)
    assert p.shape == (6, padded(300) // 4) and p.dtype == np.uint8
    np.testing.assert_array_equal(unpack_kernel(p, 300), t)
    assert (unpack_kernel(p, padded(300))[:, 300:] == 0).all()     # padding codes are weight 0
    odd = pack_kernel(t[:5])                                       # a padding row completes the last pair
    assert odd.shape == (6, padded(300) // 4) and padded_rows(5) == 6 and padded_rows(6) == 6
    np.testing.assert_array_equal(unpack_kernel(odd, 300, 5), t[:5])
    assert (unpack_kernel(odd, 300)[5] == 0).all()
    # row pairs: block b of row 2g + r is the 32 bytes at 64 b + 32 r of group g's run of bytes
    rows = deinterleave_rows(p)
    flat = p.reshape(3, -1)
    for n, b in [(0, 0), (3, 2), (5, 1)]:
        g, r = divmod(n, 2)
        np.testing.assert_array_equal(flat[g, 64 * b + 32 * r:64 * b + 32 * r + 32], rows[n, 32 * b:32 * b + 32])
    np.testing.assert_array_equal(interleave_rows(rows), p)
    into = np.zeros((6, p.shape[1]), np.uint8)                     # in place, as the loader fills a fused matrix
    assert interleave_rows(rows[:5], out=into) is into
    np.testing.assert_array_equal(into, odd)
    with pytest.raises(ValueError, match="out must be"):
        interleave_rows(rows[:5], out=np.zeros((5, p.shape[1]), np.uint8))
    assert padded(1) == 128 and padded(128) == 128 and padded(6912) == 6912
    with pytest.raises(ValueError, match="2-D"):
        pack_kernel(t[0])


def test_from_i2s_rows_is_the_kernel_layout():
    N, K = 7, 512
    t = _ternary(N, K)
    raw = quants.pack_i2s(t, 0.25)                                 # a whole I2_S tensor: payload + scale
    rows = raw[: N * K // 4].reshape(N, K // 4)
    packed = from_i2s_rows(rows)
    np.testing.assert_array_equal(packed, pack_kernel(t))
    np.testing.assert_array_equal(deinterleave_rows(packed, N), rows)   # the payload's rows, grouped
    np.testing.assert_array_equal(unpack_kernel(packed, K, N), t)
    _, xq, s, sm = _quantized(3, K)
    wscale = np.full(N, 0.25, np.float32)
    np.testing.assert_array_equal(_matmul(xq, s, sm, packed, wscale, ternary.KERNEL),
                                  naive.ternary_matmul(xq, s, t, wscale))
    with pytest.raises(ValueError, match="uint8"):
        from_i2s_rows(rows.astype(np.int16))
    with pytest.raises(ValueError, match="uint8"):
        from_i2s_rows(raw)
    with pytest.raises(ValueError, match="not a multiple of 128"):
        from_i2s_rows(raw[:N * 40].reshape(N, 40))


@pytest.mark.parametrize("T,D", [(1, 64), (6, 256), (3, 6912)])
def test_rmsnorm(T, D):
    x = (RNG.standard_normal((T, D)) * 3).astype(np.float32)
    w = RNG.uniform(0.5, 1.5, D).astype(np.float32)
    out = np.zeros_like(x)
    norms.rmsnorm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, naive.rmsnorm(x, w, 1e-5), rtol=2e-6, atol=1e-6)
    norms.rmsnorm(x, w, 1e-5, x)      # in place
    np.testing.assert_array_equal(x, out)


@pytest.mark.parametrize("hd,n_rot", [(64, 64), (128, 128), (64, 32)])
def test_rope_neox(hd, n_rot):
    T, H = 5, 3
    x = RNG.standard_normal((T, H, hd)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 4000], np.int32)
    cos, sin = rope.rope_table(4096, n_rot, 500000.0)
    y = x.copy()
    rope.rope_neox(y, pos, cos, sin)
    np.testing.assert_allclose(y, naive.rope_neox(x, pos, n_rot, 500000.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        rope.rope_neox(y, np.array([0, 1, 2, 3, 5000], np.int32), cos, sin)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("parallel", [False, True])
def test_rope_neox_is_the_plain_ieee_rotation_of_its_table(dtype, parallel):
    """Bit for bit the numpy rotation with the kernel's own cos/sin table (no FMA contraction), in the
    serial and the parallel driver, whatever rows run together; dims past n_rot untouched."""
    T, H, hd, n_rot = 9, 4, 128, 96
    x = (RNG.standard_normal((T, H, hd)) * 3).astype(dtype)
    pos = RNG.integers(0, 4096, T).astype(np.int32)
    cos, sin = rope.rope_table(4096, n_rot, 500000.0)
    half = n_rot // 2
    c, s = cos[pos][:, None, :].astype(dtype), sin[pos][:, None, :].astype(dtype)
    want = x.copy()
    a, b = x[..., :half], x[..., half:n_rot]
    want[..., :half] = a * c - b * s
    want[..., half:n_rot] = a * s + b * c
    y = x.copy()
    with _config.parallel_drivers() if parallel else contextlib.nullcontext():
        rope.rope_neox(y, pos, cos, sin)
    np.testing.assert_array_equal(y, want)
    one = x[4:5].copy()
    rope.rope_neox(one, pos[4:5], cos, sin)
    np.testing.assert_array_equal(one[0], y[4])


@pytest.mark.parametrize("kind", ["relu2", "silu"])
def test_gated_activation(kind):
    g = RNG.standard_normal((4, 96)).astype(np.float32) * 3
    u = RNG.standard_normal((4, 96)).astype(np.float32)
    out = np.zeros_like(g)
    activations.gated_activation(g, u, activations.RELU2 if kind == "relu2" else activations.SILU, out)
    np.testing.assert_allclose(out, naive.gated(g, u, kind), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cache", [np.float32, np.uint16])
@pytest.mark.parametrize("H,KVH,hd,bs", [(4, 2, 64, 16), (4, 4, 32, 8), (6, 1, 16, 4), (8, 2, 32, 16), (4, 1, 16, 4)])
def test_kv_write_and_attention_match_twin(H, KVH, hd, bs, cache):
    lens = [9, 1, 23]
    kc, vc, tables = naive.paged_cache(KVH, hd, bs, 32, lens, cache, RNG)
    ks = [RNG.standard_normal((n, KVH, hd)).astype(np.float32) for n in lens]
    vs = [RNG.standard_normal((n, KVH, hd)).astype(np.float32) for n in lens]
    if cache == np.uint16:        # float16 cache: the twin attends over the float16-rounded K/V
        ks = [k.astype(np.float16).astype(np.float32) for k in ks]
        vs = [v.astype(np.float16).astype(np.float32) for v in vs]
    qs = [RNG.standard_normal((n, H, hd)).astype(np.float32) for n in lens]
    # one step holding all rows of all sequences (prefill of several sequences at once)
    row_seq = np.concatenate([np.full(n, s, np.int32) for s, n in enumerate(lens)])
    row_pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
    scratch = attention.attention_scratch(numba.config.NUMBA_NUM_THREADS, 32, hd, H // KVH)
    attention.kv_write(np.concatenate(ks), np.concatenate(vs), kc, vc, tables, row_seq, row_pos, scratch)
    q = np.concatenate(qs)
    out = np.zeros_like(q)
    attention.attention(q, kc, vc, tables, row_seq, row_pos, out, scratch)
    ref = np.concatenate([naive.causal_attention(qs[s], ks[s], vs[s]) for s in range(len(lens))])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    if cache == np.uint16:        # stored exactly as numpy's float16 bits
        np.testing.assert_array_equal(kc[:, tables[2, 0], 3], ks[2][3].astype(np.float16).view(np.uint16))
    # a decode row (last position only) gives the same values as its row in the prefill
    last = np.zeros((1, H, hd), np.float32)
    attention.attention(qs[2][-1:].copy(), kc, vc, tables, np.array([2], np.int32), np.array([22], np.int32), last,
                        scratch)
    np.testing.assert_array_equal(last[0], out[-1])


@pytest.mark.parametrize("cache", [np.float32, np.uint16])
@pytest.mark.parametrize("H,KVH,window", [(8, 2, 0), (8, 2, 13), (4, 2, 0), (4, 2, 13), (4, 2, 1)])
def test_grouped_attention_kernels_match_the_general_one(H, KVH, window, cache):
    """``_attention_g4`` / ``_attention_g2`` (4 / 2 query heads per KV head) against ``_attention`` on the same cache:
    prefill rows of several sequences over 16-position blocks (many 4-position passes, odd tails) and sliding
    windows whose first position is not a multiple of 4; the same values up to the sums' order."""
    hd, bs, lens = 24, 16, [37, 1, 70]
    kc, vc, tables = naive.paged_cache(KVH, hd, bs, 16, lens, cache, RNG)
    row_seq = np.concatenate([np.full(n, s, np.int32) for s, n in enumerate(lens)])
    row_pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
    kv = RNG.standard_normal((2, len(row_seq), KVH, hd))
    scratch = attention.attention_scratch(numba.config.NUMBA_NUM_THREADS, 70, hd, H // KVH)
    attention.kv_write(kv[0], kv[1], kc, vc, tables, row_seq, row_pos, scratch)
    q = RNG.standard_normal((len(row_seq), H, hd))
    grouped, general = np.zeros_like(q), np.zeros_like(q)
    kernel = {4: attention._attention_g4, 2: attention._attention_g2}[attention.grouped_kernel(H // KVH, bs)]
    kernel(q, kc, vc, tables, row_seq, row_pos, np.int64(window), 0.3, scratch, grouped)
    attention._attention(q, kc, vc, tables, row_seq, row_pos, np.int64(window), 0.3, scratch, general)
    np.testing.assert_allclose(grouped, general, rtol=1e-12, atol=1e-13)
    assert attention.grouped_kernel(4, 6) == attention.grouped_kernel(3, 16) == 0


def test_row_kernels_give_the_same_row_serial_or_parallel():
    """Small inputs take a serial driver, large ones a parallel one: a row's result is bit-identical in both."""
    from jit_kernels._config import SERIAL_MAX
    D, F, H, hd = 512, 768, 4, 64
    T = SERIAL_MAX // D + 3                               # above the serial limit for every kernel below
    x = RNG.standard_normal((T, D)) * 3
    w = RNG.standard_normal(D).astype(np.float32)
    big, one = np.zeros_like(x), np.zeros((1, D))
    norms.rmsnorm(x, w, 1e-5, big)
    norms.rmsnorm(x[7:8], w, 1e-5, one)
    np.testing.assert_array_equal(big[7], one[0])
    g, u = RNG.standard_normal((T, F)), RNG.standard_normal((T, F))
    for kind in (activations.RELU2, activations.SILU):
        big, one = np.zeros_like(g), np.zeros((1, F))
        activations.gated_activation(g, u, kind, big)
        activations.gated_activation(g[7:8], u[7:8], kind, one)
        np.testing.assert_array_equal(big[7], one[0])
    cos, sin = rope.rope_table(T, hd, 10000.0)
    q = RNG.standard_normal((T, H, hd))
    pos = np.arange(T, dtype=np.int32)
    q1 = q[7:8].copy()
    rope.rope_neox(q, pos, cos, sin)
    rope.rope_neox(q1, pos[7:8], cos, sin)
    np.testing.assert_array_equal(q[7], q1[0])
    xq, s, sm = np.zeros((T, D), np.int8), np.zeros(T, np.float32), np.zeros(T, np.int32)
    ternary.quantize_rows(x, xq, s, sm)
    ternary.quantize_rows(x[7:8], xq[:1], s, sm)
    np.testing.assert_array_equal(xq[0], xq[7])
    for cache in (np.float32, np.uint16):
        kv = RNG.standard_normal((T, 2, hd))
        kc, vc = np.zeros((2, T, 1, hd), cache), np.zeros((2, T, 1, hd), cache)
        tables = np.arange(T, dtype=np.int32).reshape(T, 1)
        scratch = attention.attention_scratch(numba.config.NUMBA_NUM_THREADS, 1, hd)
        attention.kv_write(kv, kv, kc, vc, tables, np.arange(T, dtype=np.int32), np.zeros(T, np.int32), scratch)
        kc1, vc1 = np.zeros_like(kc), np.zeros_like(vc)
        attention.kv_write(kv[7:8], kv[7:8], kc1, vc1, tables, np.array([7], np.int32), np.array([0], np.int32),
                           scratch)
        with pytest.raises(ValueError, match="scratch"):
            attention.kv_write(kv, kv, kc, vc, tables, np.arange(T, dtype=np.int32), np.zeros(T, np.int32),
                               scratch[:, :hd - 1])
        np.testing.assert_array_equal(kc[:, 7], kc1[:, 7])


def test_softmax_numerators_match_numpy_exp_within_2_ulp():
    # the attention's vectorised float64 exp (Cephes) against numpy's: the scores minus their max, so the largest
    # weight is exactly 1; below ln(2^-1022) the weight is 0 (numpy gives a subnormal)
    x = np.concatenate([-RNG.random(20000) * 40, -RNG.random(2000) * 700, -np.logspace(-18, 2, 500),
                        [3.5, 3.5 - 1e-12, 3.5 - 708.3, 3.5 - 708.5, 3.5 - 745.2, -np.inf]])
    got = x.copy()
    attention._softmax_numerators(got)
    want = np.exp(x - x.max())
    normal = want >= np.finfo(np.float64).tiny
    assert np.all(np.abs(got[normal] - want[normal]) <= 2 * np.spacing(want[normal]))
    assert np.all(got[~normal] == 0.0) and (~normal).sum() == 3
    assert got[x == x.max()][0] == 1.0
    nan = np.array([0.0, np.nan, -1.0])
    attention._softmax_numerators(nan)
    assert np.isnan(nan[1]) and nan[0] == 1.0 and abs(nan[2] - np.exp(-1.0)) <= 2 * np.spacing(np.exp(-1.0))


def _map_u16(f, a):
    @numba.njit
    def run(a, out):
        for i in range(a.size):
            out[i] = f(a[i])
    out = np.zeros(a.size)
    run(a, out)
    return out


def test_half_bits_round_like_numpy_and_widen_exactly():
    x = np.concatenate([RNG.standard_normal(20000) * 10.0 ** RNG.integers(-9, 6, 20000),
                        np.arange(-70000.0, 70000.0, 0.25),                     # ties at every magnitude
                        [0.0, -0.0, 65504.0, 65519.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -25, 2.0 ** -14,
                         2.0 ** -14 - 2.0 ** -25, 1e-30]])
    def half(values):
        values = np.asarray(values, np.float64)
        out = np.zeros(values.shape[0], np.uint16)
        attention.half_bits_row(values, out, np.zeros(values.shape[0], np.float32))
        return out

    bits = half(x)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float32).astype(np.float16)
    fin = np.isfinite(ref)
    assert fin.sum() > 100000
    np.testing.assert_array_equal(bits[fin], ref.view(np.uint16)[fin])
    # saturate instead of inf (also float32 overflow), signed zero, NaN
    assert half([1e6, -65520.0, 1e300, -np.inf, -0.0, np.nan]).tolist() == [0x7BFF, 0xFBFF, 0x7BFF, 0xFBFF, 0x8000,
                                                                             0x7E00]
    # reads: every float16 bit pattern widens exactly, by F16C (the avx2 kernels) and by integer operations
    every = np.arange(65536, dtype=np.uint16)
    halves = every.view(np.float16).astype(np.float64)
    for widen in (attention._half_bits_to_f64_portable, attention._to_f64) + \
            ((attention._half_bits_to_f64_f16c,) if _cpu.HAS_AVX2 else ()):
        wide = _map_u16(widen, every)
        np.testing.assert_array_equal(wide, halves)             # nan == nan here; +-inf and +-0 keep their sign
        assert np.signbit(wide[0x8000]) and np.isnan(wide[0x7E00]) and wide[0xFC00] == -np.inf


def test_index_range_checks():
    from jit_kernels._bounds import in_range, min_max
    a = np.array([3, -1, 7, 2], np.int32)
    assert min_max(a, 4) == (-1, 7) and min_max(a, 1) == (3, 3)
    assert not in_range(a, 4, 8)                  # -1
    assert in_range(a, 1, 4) and not in_range(a, 1, 3)
    assert in_range(a, 0, 0)                      # nothing to check
    assert in_range(np.array([0, 7], np.int64), 2, 8) and not in_range(np.array([0, 8], np.int64), 2, 8)
    with pytest.raises(ValueError, match="position out of range"):
        rope.rope_neox(np.zeros((2, 1, 4)), np.array([0, 5], np.int32), *rope.rope_table(5, 4, 10000.0))
    with pytest.raises(ValueError, match="token id out of range"):
        embedding.embed(np.array([1, -1], np.int32), np.zeros((4, 8), np.float32), embedding.F32,
                        np.zeros((2, 8), np.float32))


def test_attention_rejects_position_beyond_table():
    kc, vc, tables = naive.paged_cache(1, 8, 4, 4, [4], np.float32, RNG)
    with pytest.raises(ValueError):
        attention.attention(np.zeros((1, 1, 8), np.float32), kc, vc, tables, np.array([0], np.int32),
                            np.array([4], np.int32), np.zeros((1, 1, 8), np.float32),
                            attention.attention_scratch(numba.config.NUMBA_NUM_THREADS, 8, 8))


@pytest.mark.parametrize("D", [96, 104])        # the AVX2 tiles take 16 columns per pass, 104 leaves a last 8
@pytest.mark.parametrize("kind", [embedding.F16, embedding.BF16, embedding.F32])
def test_embed_and_lm_head(kind, D):
    import numba
    V = 300
    table32 = (RNG.standard_normal((V, D)) * 0.1).astype(np.float32)
    table32[0, :4] = [6e-8, -3e-5, 65504.0, 0.0]              # f16 subnormals and the max normal
    if kind == embedding.F16:
        table = table32.astype(np.float16).view(np.uint16)
        wide = table.view(np.float16).astype(np.float32)
    elif kind == embedding.BF16:
        table = (table32.view(np.uint32) >> 16).astype(np.uint16)
        wide = (table.astype(np.uint32) << 16).view(np.float32)
    else:
        table, wide = table32, table32
    toks = np.array([0, 5, 299], np.int32)
    e = np.zeros((3, D), np.float32)
    embedding.embed(toks, table, kind, e)
    np.testing.assert_array_equal(e, wide[toks])
    scratch = embedding.lm_head_scratch(numba.config.NUMBA_NUM_THREADS, D)
    x = RNG.standard_normal((11, D)).astype(np.float32)
    ref = x.astype(np.float64) @ wide[:V - 1].astype(np.float64).T
    outs = {}
    for kernel in KERNELS:
        out = outs[kernel] = np.zeros((11, V - 1), np.float32)  # odd vocabulary, 11 rows: every tile and its tails
        embedding.lm_head(x, table[:V - 1], kind, scratch, out, kernel=kernel)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)
        # a row's logits do not depend on the batch: alone, in a group of 4, or in a short last group
        for rows in ([6], [4, 5, 6, 7], [5, 6], [0, 1, 2, 3, 4, 5, 6]):
            part = np.zeros((len(rows), V - 1), np.float32)
            embedding.lm_head(np.ascontiguousarray(x[rows]), table[:V - 1], kind, scratch, part, kernel=kernel)
            np.testing.assert_array_equal(part[rows.index(6)], out[6])
    if "avx512" in outs:            # the same 8-lane FMA chains and lane sum in other tiles: the same bits
        np.testing.assert_array_equal(outs["avx512"], outs["avx2"])
    with pytest.raises(ValueError):
        embedding.lm_head(x[:3], table, kind, scratch, np.zeros((2, V), np.float32))
    with pytest.raises(ValueError, match="kernel must be"):
        embedding.lm_head(x[:3], table, kind, scratch, np.zeros((3, V), np.float32), kernel="sse9")
    with pytest.raises(TypeError):
        embedding.lm_head(x[:3], table.view(np.int16) if kind != embedding.F32 else table.astype(np.float64), kind,
                          scratch, np.zeros((3, V), np.float32))
