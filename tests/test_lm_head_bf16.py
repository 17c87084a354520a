"""The opt-in bf16 lm_head (``jit_kernels.lm_head_bf16``): every path against the numpy twin bit for bit, rows
independent of the batch and the thread count, and the engine with ``lm_head_dtype="bf16"``."""
import json
from pathlib import Path

import numba
import numpy as np
import pytest

import bitnet_batch
from bitnet_batch.engine.engine import Engine, EngineConfig
from bitnet_batch.errors import ConfigError
from jit_kernels import embedding
from jit_kernels import lm_head_bf16 as L
from jit_kernels._cpu import HAS_AVX512_BF16, available_kernels

REF = Path(__file__).parent / "data" / "reference"
RNG = np.random.default_rng(7)


def bf16_bits(a) -> np.ndarray:
    """numpy twin of the rounding: float32 -> bfloat16 bits, round to nearest even, NaN kept quiet."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (u >> 16) | 0x40, rounded).astype(np.uint16)


def widen(bits) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def twin(xb, table) -> np.ndarray:
    """numpy twin of the lm_head: per 32-element chunk, lane l adds the odd product then the even one (float32,
    each rounded once); then the lanes pairwise: l + (l+8), + (l+4), + (l+2), + (l+1)."""
    x, w = widen(xb), widen(table)
    acc = np.zeros((x.shape[0], w.shape[0], L.LANES), np.float32)
    for k in range(0, x.shape[1], L.CHUNK):
        acc = acc + x[:, None, k + 1:k + L.CHUNK:2] * w[None, :, k + 1:k + L.CHUNK:2]
        acc = acc + x[:, None, k:k + L.CHUNK:2] * w[None, :, k:k + L.CHUNK:2]
    for half in (8, 4, 2, 1):
        acc = acc[..., :half] + acc[..., half:2 * half]
    return acc[..., 0]


def rounded(x):
    Dp = L.padded_dim(x.shape[1])
    xb, xr = np.zeros((x.shape[0], Dp), np.uint16), np.zeros((x.shape[0], Dp), np.float32)
    L.round_rows(np.ascontiguousarray(x), xb, xr)
    return xb, xr


def test_rounding_matches_the_twin_and_known_values():
    specials = np.array([1.0, -2.0, 1.00390625, 1.01171875, 3.4e38, -np.inf, np.inf, np.nan, -0.0, 1e-40],
                        np.float32)
    x = np.concatenate([specials, RNG.standard_normal(7 * 713 - len(specials)) * 10.0 ** RNG.integers(-30, 30, 7 * 713
                                                                                                     - len(specials))])
    x = x.astype(np.float32).reshape(7, 713)       # D not a multiple of 32: the padding is zero
    xb, xr = rounded(x)
    D = x.shape[1]
    np.testing.assert_array_equal(xb[:, :D], bf16_bits(x))
    assert not xb[:, D:].any() and not xr[:, D:].any()
    np.testing.assert_array_equal(xr[:, :D].view(np.uint32), widen(xb[:, :D]).view(np.uint32))
    known = {1.0: 0x3F80, -2.0: 0xC000, 1.00390625: 0x3F80, 1.01171875: 0x3F82, 3.4e38: 0x7F80}  # ties to even
    flat = x.reshape(-1)
    for value, bits in known.items():
        i = int(np.flatnonzero(flat == np.float32(value))[0])
        assert xb[i // D, i % D] == bits, value
    nan = int(np.flatnonzero(np.isnan(flat))[0])
    assert np.isnan(xr[nan // D, nan % D])


@pytest.mark.parametrize("kind", [embedding.F16, embedding.BF16, embedding.F32])
def test_table_rounding_every_kind(kind):
    V, D = 37, 104
    t32 = (RNG.standard_normal((V, D)) * 0.1).astype(np.float32)
    t32[0, :3] = [6e-8, -3e-5, 65504.0]
    if kind == embedding.F16:
        table, wide = t32.astype(np.float16).view(np.uint16), t32.astype(np.float16).astype(np.float32)
    elif kind == embedding.BF16:
        table = (t32.view(np.uint32) >> 16).astype(np.uint16)
        wide = widen(table)
    else:
        table, wide = t32, t32
    out = np.full((V, L.padded_dim(D)), 0xFFFF, np.uint16)
    L.bf16_table(table, kind, out)
    np.testing.assert_array_equal(out[:, :D], bf16_bits(wide))
    assert not out[:, D:].any()
    with pytest.raises(ValueError):
        L.bf16_table(table, kind, np.zeros((V, D), np.uint16) if D % 32 else np.zeros((V, D + 1), np.uint16))
    with pytest.raises(TypeError):
        L.bf16_table(table.astype(np.float64), kind, out)


@pytest.mark.parametrize("kernel", available_kernels())
@pytest.mark.parametrize("D", [96, 104])         # 104: 8 columns of zero padding
def test_every_path_gives_the_twin_bits(kernel, D):
    V = 299                                     # tasks of 64 rows with a short last one, tiles and their tails
    table = np.zeros((V, L.padded_dim(D)), np.uint16)
    L.bf16_table((RNG.standard_normal((V, D)) * 0.1).astype(np.float32), embedding.F32, table)
    x = RNG.standard_normal((11, D)).astype(np.float32)
    xb, xr = rounded(x)
    scratch = L.scratch(numba.config.NUMBA_NUM_THREADS, D)
    out = np.zeros((11, V), np.float32)
    L.lm_head_bf16(xb, xr, table, scratch, out, kernel=kernel)
    np.testing.assert_array_equal(out, twin(xb, table))
    ref = x.astype(np.float64) @ widen(table[:, :D]).astype(np.float64).T
    np.testing.assert_allclose(out, ref, rtol=0.02, atol=0.05)       # bfloat16 rows: ~2^-9 relative each
    for rows in ([6], [4, 5, 6, 7], [5, 6], [0, 1, 2, 3, 4, 5, 6]):    # alone, in a tile of 4, in a short group
        part = np.zeros((len(rows), V), np.float32)
        L.lm_head_bf16(np.ascontiguousarray(xb[rows]), np.ascontiguousarray(xr[rows]), table, scratch, part,
                       kernel=kernel)
        np.testing.assert_array_equal(part[rows.index(6)], out[6])
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = np.zeros((11, V), np.float32)
        L.lm_head_bf16(xb, xr, table, scratch, one, kernel=kernel)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(one, out)


def test_the_vdpbf16ps_tiles_run_where_the_cpu_has_them():
    """The avx512 family takes ``vdpbf16ps`` on an AVX512_BF16 CPU and the FMA tiles elsewhere; the other
    families never take it (the bits are the twin's either way: above)."""
    if not HAS_AVX512_BF16:
        pytest.skip("this CPU lacks AVX512_BF16 (or AVX-512 VNNI): the vdpbf16ps tiles cannot run here")
    assert L.has_fast_path("avx512") and not L.has_fast_path("avx2") and not L.has_fast_path("portable")


def test_input_checks():
    table = np.zeros((5, 32), np.uint16)
    xb, xr = np.zeros((2, 32), np.uint16), np.zeros((2, 32), np.float32)
    scratch = L.scratch(numba.config.NUMBA_NUM_THREADS, 32)
    with pytest.raises(ValueError, match="do not match"):
        L.lm_head_bf16(xb, xr, table, scratch, np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        L.lm_head_bf16(xb, xr, np.zeros((5, 64), np.uint16), scratch, np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="kernel must be"):
        L.lm_head_bf16(xb, xr, table, scratch, np.zeros((2, 5), np.float32), kernel="sse9")
    with pytest.raises(ValueError, match="do not match"):
        L.round_rows(np.zeros((2, 20), np.float32), np.zeros((2, 20), np.uint16), np.zeros((2, 20), np.float32))


@pytest.fixture(scope="module")
def model():
    return bitnet_batch.load_model(REF / "tiny-i2s-b158.gguf")


def test_engine_bf16_lm_head(model):
    """lm_head_dtype bf16: each step's logits are the twin's over the step's normed rows and the model's bf16
    table; close to the spec's float32 logits; cached decode == prefill; rows independent of the batch."""
    ids = np.array(json.loads((REF / "tiny-i2s-b158.json").read_text())["sequences"]["s2_len40"]["ids"], np.int32)
    eng = Engine(model, EngineConfig(max_batch=2, max_seq_len=64, prefill_chunk=16, block_size=8,
                                     lm_head_dtype="bf16"))
    assert eng.lm_bf16 is model.bf16_lm_head()          # one table per model, shared by its engines
    w = model.weights
    np.testing.assert_array_equal(eng.lm_bf16[:, :w.output.shape[1]],
                                  bf16_bits(w.output.view(np.float16).astype(np.float32)
                                            if w.output_kind == embedding.F16 else w.output))
    slot = eng.kv.allocate()
    full = eng.all_logits(slot, ids)
    eng.kv.free(slot)
    f32 = model.logits(ids)
    assert 0 < np.abs(full - f32).max() < 0.05 * np.abs(f32).max()
    assert (full.argmax(1) == f32.argmax(1)).mean() >= 0.9
    a, b = eng.kv.allocate(), eng.kv.allocate()
    eng.step([(b, ids[:7], 0, False)])
    got = eng.step([(a, ids[:10], 0, True), (b, ids[7:9], 7, True)])
    np.testing.assert_array_equal(got[0], full[9])
    xb, _ = rounded(eng.ws.xl32[:2])                   # the step's normed rows, as the lm_head took them
    np.testing.assert_array_equal(np.stack(got), twin(xb, eng.lm_bf16))
    for p in range(10, len(ids)):
        got = eng.step([(a, ids[p:p + 1], p, True), (b, ids[p - 1:p], p - 1, True)])
        np.testing.assert_array_equal(got[0], full[p])
    with pytest.raises(ConfigError, match="lm_head_dtype must be one of f32, bf16"):
        EngineConfig(lm_head_dtype="f16")


def _present_pages(a) -> int:
    """How many of the whole pages inside array ``a``'s bytes are resident (``/proc/self/pagemap``)."""
    import mmap

    page = mmap.PAGESIZE
    lo = -(-a.ctypes.data // page) * page
    hi = (a.ctypes.data + a.nbytes) // page * page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(lo // page * 8)
        entries = np.frombuffer(f.read((hi - lo) // page * 8), np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum())


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="reads page residency from /proc (Linux)")
@pytest.mark.parametrize("path", [REF / "tiny-i2s-b158.gguf", REF.parent / "hf" / "tiny-packed-gqa"])
def test_the_bf16_table_replaces_the_files_pages(path):
    """Building the bf16 table drops the file's table from the process's resident pages (GGUF and safetensors),
    so the copy is not counted twice; the embedding lookup still reads the file's rows."""
    fresh = bitnet_batch.load_model(path)
    w = fresh.weights
    np.asarray(w.output).sum()                  # read every page of it
    assert _present_pages(w.output) > 0
    fresh.bf16_lm_head()
    assert _present_pages(w.output) == 0
    eng = Engine(fresh, EngineConfig(max_batch=1, max_seq_len=16, prefill_chunk=8, lm_head_dtype="bf16"))
    out = eng.step([(eng.kv.allocate(), np.array([1, 2, 3], np.int32), 0, True)])[0]
    f32 = fresh.logits([1, 2, 3])[-1]
    assert np.abs(out - f32).max() < 0.05 * np.abs(f32).max()
