"""Ternary codecs: byte-for-byte proof against the reference GGUFs, round trips, hand-made layouts."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

from bitnet_batch.model import quants
from bitnet_batch.model.gguf import GGMLType, GGUFFile

REF = pathlib.Path(__file__).parent / "data" / "reference"
CODECS = {
    GGMLType.I2_S: (quants.unpack_i2s, quants.pack_i2s),
    GGMLType.TQ2_0: (quants.unpack_tq2_0, quants.pack_tq2_0),
    GGMLType.TQ1_0: (quants.unpack_tq1_0, quants.pack_tq1_0),
}


def _ternary_tensors(path):
    g = GGUFFile(path)
    return g, [t for t in g.tensors.values() if t.ggml_type in CODECS]


def _unpack_all(path):
    g, infos = _ternary_tensors(path)
    return {t.name: CODECS[t.ggml_type][0](g.raw(t.name), *t.shape) for t in infos}


# ---- proof against the reference files ---------------------------------------------------------------------

@pytest.mark.parametrize("fname, ggml_type", [("tiny-i2s-b158.gguf", GGMLType.I2_S),
                                              ("tiny-tq2_0-bitnet.gguf", GGMLType.TQ2_0),
                                              ("tiny-tq1_0-bitnet.gguf", GGMLType.TQ1_0)])
def test_reference_tensors_repack_byte_for_byte(fname, ggml_type):
    g, infos = _ternary_tensors(REF / fname)
    assert len(infos) == 28 and all(t.ggml_type == ggml_type for t in infos)
    unpack, pack = CODECS[ggml_type]
    for info in infos:
        raw = g.raw(info.name)
        t, scale = unpack(raw, *info.shape)
        assert t.shape == (info.shape[1], info.shape[0]) and t.dtype == np.int8
        counts = [(t == v).mean() for v in (-1, 0, 1)]
        assert all(0.25 < c < 0.45 for c in counts), (info.name, counts)   # real ternary data, not zeros
        assert np.all(np.asarray(scale) > 0)
        np.testing.assert_array_equal(pack(t, scale), raw, err_msg=info.name)


def test_reference_i2s_scale_is_tail_float():
    g, infos = _ternary_tensors(REF / "tiny-i2s-b158.gguf")
    for info in infos:
        ne = info.shape[0] * info.shape[1]
        raw = g.raw(info.name)
        _, scale = quants.unpack_i2s(raw, *info.shape)
        assert scale == raw[ne // 4: ne // 4 + 4].view("<f4")[0]
        assert not raw[ne // 4 + 4:].any()                      # 28 zero padding bytes


def test_tq1_tq2_f32_reference_models_share_weights():
    tq2 = _unpack_all(REF / "tiny-tq2_0-bitnet.gguf")
    tq1 = _unpack_all(REF / "tiny-tq1_0-bitnet.gguf")
    f32 = GGUFFile(REF / "tiny-f32-bitnet.gguf")
    assert tq2.keys() == tq1.keys() and len(tq2) == 28
    for name, (t2, d2) in tq2.items():
        t1, d1 = tq1[name]
        np.testing.assert_array_equal(t1, t2, err_msg=name)
        np.testing.assert_array_equal(d1, d2, err_msg=name)
        assert np.all(d2 == d2[0, 0])                           # one scale per tensor, as a b1.58 checkpoint
        info = f32.tensors[name]
        assert info.ggml_type == GGMLType.F32
        w = quants.float_tensor(f32.raw(name), info.ggml_type, info.shape)
        np.testing.assert_array_equal(w, t2 * np.repeat(d2, 256, axis=1), err_msg=name)


# ---- round trips ---------------------------------------------------------------------------------------------

def _random_ternary(rng, ne1, ne0):
    return rng.integers(-1, 2, size=(ne1, ne0)).astype(np.int8)


@pytest.mark.parametrize("ne0, ne1", [(128, 1), (256, 3), (384, 5), (64, 6), (1280, 2)])
def test_i2s_round_trip(ne0, ne1):
    rng = np.random.default_rng(ne0 * 7 + ne1)
    t = _random_ternary(rng, ne1, ne0)
    raw = quants.pack_i2s(t, 0.0421)
    assert raw.dtype == np.uint8 and raw.size == ne0 * ne1 // 4 + 32
    t2, scale = quants.unpack_i2s(raw, ne0, ne1)
    np.testing.assert_array_equal(t2, t)
    assert scale == np.float32(0.0421)


@pytest.mark.parametrize("codec", [GGMLType.TQ2_0, GGMLType.TQ1_0])
@pytest.mark.parametrize("ne0, ne1", [(256, 1), (512, 3), (768, 2)])
def test_tq_round_trip_with_block_scales(codec, ne0, ne1):
    unpack, pack = CODECS[codec]
    rng = np.random.default_rng(ne0 + ne1)
    t = _random_ternary(rng, ne1, ne0)
    d = rng.uniform(0.01, 2.0, size=(ne1, ne0 // 256)).astype(np.float32)
    raw = pack(t, d)
    assert raw.size == ne1 * ne0 // 256 * (66 if codec == GGMLType.TQ2_0 else 54)
    t2, d2 = unpack(raw, ne0, ne1)
    np.testing.assert_array_equal(t2, t)
    np.testing.assert_array_equal(d2, d.astype(np.float16).astype(np.float32))


def test_tq_scalar_d_fills_every_block():
    t = np.zeros((2, 512), np.int8)
    for unpack, pack in (CODECS[GGMLType.TQ2_0], CODECS[GGMLType.TQ1_0]):
        _, d = unpack(pack(t, 0.1), 512, 2)
        assert d.shape == (2, 2) and np.all(d == np.float32(np.float16(0.1)))


def test_all_trit_patterns_tq1_0():
    # Every 5-trit combination (3^5 = 243) in every qs byte position, and every 4-trit one in qh.
    codes = np.array(np.meshgrid(*[np.arange(3)] * 5, indexing="ij")).reshape(5, -1).T   # [243, 5]
    rows = []
    for k in range(0, 243, 3):
        row = np.zeros(256, np.int64)
        for n in range(5):
            row[np.arange(32) + 32 * n] = codes[(k + np.arange(32)) % 243, n]
            row[160 + np.arange(16) + 16 * n] = codes[(k + 5 + np.arange(16)) % 243, n]
        for n in range(4):
            row[240 + np.arange(4) + 4 * n] = codes[(k + 11 + np.arange(4) * 50) % 81, n + 1]
        rows.append(row - 1)
    t = np.array(rows, np.int8)
    t2, _ = quants.unpack_tq1_0(quants.pack_tq1_0(t, 1.0), 256, len(rows))
    np.testing.assert_array_equal(t2, t)


# ---- hand-made layouts -----------------------------------------------------------------------------------------

def test_i2s_bit_layout():
    t = np.zeros((1, 128), np.int8)
    t[0, 0] = 1          # byte 0 bits 7-6 -> code 2
    t[0, 33] = -1        # byte 1 bits 5-4 -> code 0
    t[0, 127] = 1        # byte 31 bits 1-0 -> code 2
    raw = quants.pack_i2s(t, 2.0)
    assert raw[0] == 0b10_01_01_01
    assert raw[1] == 0b01_00_01_01
    assert raw[31] == 0b01_01_01_10
    assert np.all(raw[2:31] == 0b01_01_01_01)
    assert raw[32:36].view("<f4")[0] == 2.0 and not raw[36:].any()


def test_tq2_0_bit_layout():
    t = np.zeros((1, 256), np.int8)
    t[0, 0] = 1          # byte 0 bits 1-0
    t[0, 32] = -1        # byte 0 bits 3-2
    t[0, 128 + 96 + 5] = 1   # second half: byte 32 + 5, bits 7-6
    raw = quants.pack_tq2_0(t, 1.5)
    assert raw[0] == 0b01_01_00_10
    assert raw[37] == 0b10_01_01_01
    assert raw[64:66].view("<f2")[0] == np.float16(1.5)


def test_tq1_0_zero_block_bytes():
    # All codes 1: qs byte = ceil(11111_3 * 256 / 243) = ceil(121 * 256 / 243) = 128;
    # qh byte = ceil(1111_3 * 3 * 256 / 243) = ceil(120 * 256 / 243) = 127.
    raw = quants.pack_tq1_0(np.zeros((1, 256), np.int8), 0.5)
    assert np.all(raw[:48] == 128) and np.all(raw[48:52] == 127)
    assert raw[52:54].view("<f2")[0] == np.float16(0.5)


def test_code_3_decodes_to_zero():
    t, _ = quants.unpack_i2s(np.full(128 // 4 + 32, 0xFF, np.uint8), 128, 1)
    assert not t.any()
    raw = np.full(66, 0xFF, np.uint8)
    raw[64:66] = np.array([1.0], "<f2").view(np.uint8)
    t, _ = quants.unpack_tq2_0(raw, 256, 1)
    assert not t.any()


# ---- validation --------------------------------------------------------------------------------------------------

def test_codec_input_errors():
    with pytest.raises(ValueError, match="expected 64"):
        quants.unpack_i2s(np.zeros(63, np.uint8), 128, 1)
    with pytest.raises(ValueError, match="multiple of the block size 128"):
        quants.unpack_i2s(np.zeros(64, np.uint8), 100, 1)
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        quants.pack_tq2_0(np.zeros((1, 128), np.int8), 1.0)
    with pytest.raises(ValueError, match=r"in \{-1, 0, 1\}"):
        quants.pack_i2s(np.full((1, 128), 2, np.int8), 1.0)
    with pytest.raises(ValueError, match="d must be a scalar or shape"):
        quants.pack_tq1_0(np.zeros((2, 256), np.int8), np.ones((2, 2)))
    with pytest.raises(ValueError, match="1-D uint8"):
        quants.unpack_tq2_0(np.zeros(66, np.float32), 256, 1)
    with pytest.raises(ValueError, match="finite"):
        quants.pack_i2s(np.zeros((1, 128), np.int8), float("nan"))


# ---- float tensors ---------------------------------------------------------------------------------------------

def test_float_tensor_types_and_shape_order():
    vals = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -0.25]], np.float32)    # numpy [ne1=2, ne0=3]
    raw32 = vals.reshape(-1).view(np.uint8)
    out = quants.float_tensor(raw32, GGMLType.F32, (3, 2))
    np.testing.assert_array_equal(out, vals)
    assert np.shares_memory(out, raw32)                                   # F32 is a view
    raw16 = vals.astype("<f2").reshape(-1).view(np.uint8)
    np.testing.assert_array_equal(quants.float_tensor(raw16, GGMLType.F16, (3, 2)), vals)
    bf16 = (vals.view(np.uint32) >> 16).astype("<u2").reshape(-1).view(np.uint8)
    np.testing.assert_array_equal(quants.float_tensor(bf16, GGMLType.BF16, (3, 2)), vals)
    assert quants.float_tensor(np.array([0x80, 0x3F], np.uint8), GGMLType.BF16, (1,))[0] == 1.0
    with pytest.raises(ValueError, match="not F32, F16 or BF16"):
        quants.float_tensor(raw32, GGMLType.Q8_0, (3, 2))
    with pytest.raises(ValueError, match="has 8 bytes, expected 24"):
        quants.float_tensor(raw32[:8], GGMLType.F32, (3, 2))
