"""GGUF reader: the reference models, the LLaMA-3 tokenizer GGUF, and corrupt files."""
from __future__ import annotations

import json
import pathlib
import struct
import time

import gguf as pip_gguf
import numpy as np
import pytest

from bitnet_batch.errors import ModelFormatError, ModelNotFoundError
from bitnet_batch.model.gguf import GGMLType, GGUFFile, GGUFValueType, TensorInfo, tensor_nbytes
from bitnet_batch.testing.gguf_writer import GGUFWriter

DATA = pathlib.Path(__file__).parent / "data"
REF = DATA / "reference"
TOKENIZER = DATA / "tokenizer" / "ggml-vocab-llama-bpe.gguf"
LAYER_PARTS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_sub_norm", "attn_output",
               "ffn_norm", "ffn_gate", "ffn_up", "ffn_sub_norm", "ffn_down")
# file -> (arch, weight type, embedding type, general.file_type)
REFERENCE = {
    "tiny-i2s-b158.gguf": ("bitnet-b1.58", GGMLType.I2_S, GGMLType.F16, 40),
    "tiny-tq2_0-bitnet.gguf": ("bitnet", GGMLType.TQ2_0, GGMLType.F16, 37),
    "tiny-tq1_0-bitnet.gguf": ("bitnet", GGMLType.TQ1_0, GGMLType.F16, 36),
    "tiny-f32-bitnet.gguf": ("bitnet", GGMLType.F32, GGMLType.F32, 0),
}


# ---- reference files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fname", sorted(REFERENCE))
def test_reference_metadata(fname):
    arch, _, _, file_type = REFERENCE[fname]
    g = GGUFFile(REF / fname)
    md = g.metadata
    assert (g.version, g.alignment) == (3, 32)
    assert md["general.architecture"] == arch and md["general.name"] == fname[:-5]
    expect = {"vocab_size": 512, "context_length": 1024, "embedding_length": 256, "block_count": 4,
              "feed_forward_length": 512, "rope.dimension_count": 64, "attention.head_count": 4,
              "attention.head_count_kv": 2}
    for key, value in expect.items():
        assert md[f"{arch}.{key}"] == value and type(md[f"{arch}.{key}"]) is int
        assert g.value_types[f"{arch}.{key}"] == (GGUFValueType.UINT32, None)
    assert md[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-6)
    assert md[f"{arch}.rope.freq_base"] == 500000.0
    assert md["general.file_type"] == file_type
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "llama-bpe"
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert isinstance(tokens, list) and len(tokens) == 512 and tokens[496] == "<|begin_of_text|>"
    assert isinstance(types, np.ndarray) and types.dtype == np.int32 and types.shape == (512,)
    assert g.value_types["tokenizer.ggml.token_type"] == (GGUFValueType.ARRAY, GGUFValueType.INT32)
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (496, 497)
    assert md["tokenizer.ggml.add_bos_token"] is True
    assert all(isinstance(m, str) and m.count(" ") == 1 for m in md["tokenizer.ggml.merges"])
    assert g.file_size == json.loads((REF / fname.replace(".gguf", ".json")).read_text())["file_bytes"]


@pytest.mark.parametrize("fname", sorted(REFERENCE))
def test_reference_tensors(fname):
    _, wtype, etype, _ = REFERENCE[fname]
    g = GGUFFile(REF / fname)
    names = ["token_embd.weight", "output_norm.weight"] + \
        [f"blk.{i}.{p}.weight" for i in range(4) for p in LAYER_PARTS]
    assert list(g.tensors) == names
    shapes = {"attn_q": (256, 256), "attn_k": (256, 128), "attn_v": (256, 128), "attn_output": (256, 256),
              "ffn_gate": (256, 512), "ffn_up": (256, 512), "ffn_down": (512, 256),
              "attn_norm": (256,), "attn_sub_norm": (256,), "ffn_norm": (256,), "ffn_sub_norm": (512,)}
    assert g.tensors["token_embd.weight"].shape == (256, 512)
    assert g.tensors["token_embd.weight"].ggml_type == etype
    per_tensor = {GGMLType.I2_S: 256 * 256 // 4 + 32, GGMLType.TQ2_0: 256 * 66, GGMLType.TQ1_0: 256 * 54,
                  GGMLType.F32: 256 * 256 * 4}
    for info in g.tensors.values():
        assert isinstance(info, TensorInfo) and info.offset % 32 == 0
        assert info.nbytes == tensor_nbytes(info.ggml_type, info.shape)
        raw = g.raw(info.name)
        assert raw.dtype == np.uint8 and raw.size == info.nbytes
        if info.name.startswith("blk."):
            part = info.name.split(".")[2]
            assert info.shape == shapes[part]
            assert info.ggml_type == (GGMLType.F32 if len(info.shape) == 1 else wtype)
    assert g.tensors["blk.0.attn_q.weight"].nbytes == per_tensor[wtype]
    last = max(g.tensors.values(), key=lambda t: t.offset)
    assert last.offset + last.nbytes <= g.file_size


@pytest.mark.parametrize("fname", ["tiny-tq2_0-bitnet.gguf", "tiny-tq1_0-bitnet.gguf", "tiny-f32-bitnet.gguf"])
def test_agrees_with_pip_gguf_reader(fname):
    """The pip package reads every type except I2_S: both readers must see the same tensors and bytes."""
    ours = GGUFFile(REF / fname)
    theirs = pip_gguf.GGUFReader(REF / fname)
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert (tuple(int(n) for n in t.shape), int(t.tensor_type), t.data_offset, int(t.n_bytes)) == \
            (info.shape, info.ggml_type, info.offset, info.nbytes)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        got = ours.metadata[key]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        assert got == (pytest.approx(field.contents()) if isinstance(got, float) else field.contents()), key


def test_raw_is_a_read_only_memory_map_view():
    g = GGUFFile(REF / "tiny-i2s-b158.gguf")
    raw = g.raw("blk.0.attn_q.weight")
    assert isinstance(raw, np.memmap) and not raw.flags.writeable
    with open(REF / "tiny-i2s-b158.gguf", "rb") as f:
        f.seek(g.tensors["blk.0.attn_q.weight"].offset)
        assert f.read(raw.size) == raw.tobytes()
    with pytest.raises(ModelFormatError, match="tensor not in file"):
        g.raw("nope.weight")
    with g:
        pass
    with pytest.raises(ValueError, match="closed"):
        g.raw("blk.0.attn_q.weight")
    assert raw[:4].tolist() == list(raw[:4])          # views taken before close stay valid


def test_llama3_tokenizer_gguf_loads_fast():
    t0 = time.perf_counter()
    g = GGUFFile(TOKENIZER)
    elapsed = time.perf_counter() - t0
    md = g.metadata
    assert g.tensors == {}
    assert len(md["tokenizer.ggml.tokens"]) == 128256 and md["llama.vocab_size"] == 128256
    assert len(md["tokenizer.ggml.merges"]) == 280147 and md["tokenizer.ggml.merges"][0] == "Ġ Ġ"
    assert md["tokenizer.ggml.tokens"][128000] == "<|begin_of_text|>"
    assert md["tokenizer.ggml.token_type"].dtype == np.int32 and md["tokenizer.ggml.token_type"][128000] == 3
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (128000, 128001)
    assert elapsed < 2.5, f"opening the tokenizer GGUF took {elapsed:.2f} s"


def test_tensor_nbytes():
    assert tensor_nbytes(GGMLType.F32, (256, 3)) == 3072
    assert tensor_nbytes(GGMLType.F16, (256, 3)) == tensor_nbytes(GGMLType.BF16, (256, 3)) == 1536
    assert tensor_nbytes(GGMLType.I2_S, (2560, 6912)) == 2560 * 6912 // 4 + 32
    assert tensor_nbytes(GGMLType.TQ2_0, (512, 3)) == 2 * 3 * 66
    assert tensor_nbytes(GGMLType.TQ1_0, (512, 3)) == 2 * 3 * 54
    assert tensor_nbytes(GGMLType.Q8_0, (64, 2)) == 4 * 34
    assert tensor_nbytes(GGMLType.Q4_0, (64, 2)) == 4 * 18
    assert tensor_nbytes(GGMLType.Q4_K, (512, 2)) == 4 * 144
    assert tensor_nbytes(GGMLType.Q6_K, (256,)) == 210
    with pytest.raises(ValueError, match="multiple of its block size 256"):
        tensor_nbytes(GGMLType.TQ2_0, (128, 2))
    with pytest.raises(ValueError, match="multiple of 128"):
        tensor_nbytes(GGMLType.I2_S, (100, 1))
    with pytest.raises(ValueError, match=r"TL2 \(39\) is not supported"):
        tensor_nbytes(GGMLType.TL2, (256, 1))


# ---- corrupt files -------------------------------------------------------------------------------------------

def _good_file(path, alignment=32, pad=200) -> bytes:
    """KVs (string, int, float, string array, int array) + tensors 'alpha' F32 [4, 2], 'beta' TQ2_0 [256, 2]."""
    w = GGUFWriter(alignment=alignment)
    w.add_kv("general.architecture", "test")
    w.add_kv("test.description", "x" * pad)     # pushes later fields past the header's count plausibility check
    w.add_kv("test.count", 7)
    w.add_kv("test.eps", 1e-5)
    w.add_kv("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_kv("tokenizer.ggml.token_type", np.array([1, 1, 3], np.int32))
    w.add_tensor("alpha", np.arange(8, dtype=np.float32), (4, 2), GGMLType.F32)
    w.add_tensor("beta", np.zeros(2 * 66, np.uint8), (256, 2), GGMLType.TQ2_0)
    w.write(path)
    return pathlib.Path(path).read_bytes()


def _info_fields(data: bytes, name: str) -> dict[str, int]:
    """Byte positions of one tensor info's fields."""
    at = data.index(struct.pack("<Q", len(name)) + name.encode())
    n_dims_at = at + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, n_dims_at)[0]
    type_at = n_dims_at + 4 + 8 * n_dims
    return {"name": at, "n_dims": n_dims_at, "dims": n_dims_at + 4, "type": type_at, "offset": type_at + 4}


def _patched(tmp_path, data: bytes, at: int, fmt: str, value, name="bad.gguf") -> pathlib.Path:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, at, value)
    p = tmp_path / name
    p.write_bytes(bytes(buf))
    return p


def _open_error(path) -> ModelFormatError:
    with pytest.raises(ModelFormatError) as ei:
        GGUFFile(path)
    assert str(path) in str(ei.value)
    return ei.value


def test_good_file_reads(tmp_path):
    _good_file(tmp_path / "good.gguf")
    g = GGUFFile(tmp_path / "good.gguf")
    assert g.metadata["test.count"] == 7 and g.metadata["tokenizer.ggml.tokens"] == ["a", "b", "c"]
    assert g.raw("alpha").view("<f4").tolist() == list(range(8))


def test_wrong_magic(tmp_path):
    data = _good_file(tmp_path / "good.gguf")
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUX" + data[4:])
    assert "not a GGUF file: magic b'GGUX'" in str(_open_error(p))


def test_bad_version_and_big_endian(tmp_path):
    data = _good_file(tmp_path / "good.gguf")
    assert "unsupported GGUF version 7" in str(_open_error(_patched(tmp_path, data, 4, "<I", 7)))
    assert "big-endian" in str(_open_error(_patched(tmp_path, data, 4, ">I", 3)))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ModelNotFoundError):
        GGUFFile(tmp_path / "absent.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert "empty" in str(_open_error(tmp_path / "empty.gguf"))
    assert "not a regular file" in str(_open_error(tmp_path))


def test_truncated_at_several_points(tmp_path):
    data = _good_file(tmp_path / "good.gguf")
    alpha, beta = _info_fields(data, "alpha"), _info_fields(data, "beta")
    cuts = {
        "header": (2, "truncated header"),
        "counts": (12, "truncated header"),
        "early": (24 + 5, "header claims 2 tensors, which cannot fit in the 29-byte file (truncated or corrupt)"),
        "kv string value": (data.index(b"x" * 200) + 10, "metadata entry #1 ('test.description'): string length 200"),
        "kv key": (data.index(b"tokenizer.ggml.token_type") + 5, "metadata entry #5 key: string length 25"),
        "kv value": (data.index(b"test.count") + 12, "truncated metadata entry #2 ('test.count')"),
        "string array": (data.index(b"tokenizer.ggml.tokens") + 40, "'tokenizer.ggml.tokens'"),
        "tensor info": (alpha["type"] + 2, "truncated tensor info #0"),
        "second tensor info": (beta["dims"] + 3, "truncated tensor info #1"),
    }
    for label, (cut, expect) in cuts.items():
        p = tmp_path / f"cut_{label.replace(' ', '_')}.gguf"
        p.write_bytes(data[:cut])
        assert expect in str(_open_error(p)), label
    g = GGUFFile(tmp_path / "good.gguf")
    end = g.tensors["beta"].offset + g.tensors["beta"].nbytes
    p = tmp_path / "cut_data.gguf"
    p.write_bytes(data[:end - 10])
    err = _open_error(p)
    assert err.tensor == "beta"
    assert f"truncated: tensor needs 132 bytes at offset {g.tensors['beta'].offset}, file has {end - 10}" in str(err)


def test_every_truncation_is_a_model_format_error(tmp_path):
    data = _good_file(tmp_path / "good.gguf")
    end = GGUFFile(tmp_path / "good.gguf").tensors["beta"].offset + 2 * 66
    p = tmp_path / "cut.gguf"
    for cut in range(end):           # every cut before the last data byte
        p.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError):
            GGUFFile(p)


def test_random_corruption_never_escapes_as_another_error(tmp_path):
    data = _good_file(tmp_path / "good.gguf")
    header_end = GGUFFile(tmp_path / "good.gguf").data_offset
    rng = np.random.default_rng(0)
    p = tmp_path / "fuzz.gguf"
    outcomes = set()
    for _ in range(400):
        buf = bytearray(data)
        for at in rng.integers(0, header_end, size=rng.integers(1, 4)):
            buf[at] = int(rng.integers(0, 256))
        p.write_bytes(bytes(buf))
        try:
            GGUFFile(p)
            outcomes.add("ok")
        except ModelFormatError:
            outcomes.add("error")
    assert "error" in outcomes


def test_unknown_tensor_type(tmp_path):
    data = _good_file(tmp_path / "good.gguf")
    err = _open_error(_patched(tmp_path, data, _info_fields(data, "beta")["type"], "<I", 99))
    assert err.tensor == "beta" and "unknown tensor type id 99" in str(err)
    err = _open_error(_patched(tmp_path, data, _info_fields(data, "beta")["type"], "<I", int(GGMLType.TL2)))
    assert "TL2 (39) is not supported" in str(err)


def test_absurd_length_fields(tmp_path):
    data = _good_file(tmp_path / "good.gguf")
    err = _open_error(_patched(tmp_path, data, 24, "<Q", 2**60))                 # first key's length
    assert "string length 1152921504606846976" in str(err) and "exceeds" in str(err)
    count_at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4
    err = _open_error(_patched(tmp_path, data, count_at, "<Q", 2**60))           # string array count
    assert "array of 1152921504606846976 STRING elements" in str(err)
    err = _open_error(_patched(tmp_path, data, 8, "<Q", 2**60))                  # tensor count
    assert "claims 1152921504606846976 tensors" in str(err)
    err = _open_error(_patched(tmp_path, data, 16, "<Q", 2**60))                 # KV count
    assert "claims 1152921504606846976 metadata entries" in str(err)
    err = _open_error(_patched(tmp_path, data, _info_fields(data, "alpha")["dims"], "<Q", 2**60))
    assert err.tensor == "alpha" and "truncated: tensor needs" in str(err)


def test_misaligned_and_overlapping_offsets(tmp_path):
    data = _good_file(tmp_path / "good.gguf")
    beta_off = _info_fields(data, "beta")["offset"]
    rel = struct.unpack_from("<Q", data, beta_off)[0]
    err = _open_error(_patched(tmp_path, data, beta_off, "<Q", rel + 4))
    assert err.tensor == "beta" and f"misaligned data offset {rel + 4}" in str(err)
    err = _open_error(_patched(tmp_path, data, beta_off, "<Q", 0))
    assert err.tensor == "beta" and "overlaps tensor 'alpha'" in str(err)


def test_alignment_is_honoured(tmp_path):
    for pad in range(0, 64, 8):               # header ends at every 8-byte phase of a 64-byte period
        _good_file(tmp_path / "a64.gguf", alignment=64, pad=pad)
        g = GGUFFile(tmp_path / "a64.gguf")
        assert g.alignment == 64 and g.metadata["general.alignment"] == 64
        assert g.data_offset % 64 == 0 and all(t.offset % 64 == 0 for t in g.tensors.values())
        assert g.raw("alpha").view("<f4").tolist() == list(range(8))
    data = (tmp_path / "a64.gguf").read_bytes()
    at = data.index(b"general.alignment") + len("general.alignment") + 4
    err = _open_error(_patched(tmp_path, data, at, "<I", 48))
    assert "'general.alignment' must be a positive power of two, got 48" in str(err)


def test_shape_problems(tmp_path):
    data = _good_file(tmp_path / "good.gguf")
    beta = _info_fields(data, "beta")
    err = _open_error(_patched(tmp_path, data, beta["dims"] + 8, "<Q", 0))
    assert err.tensor == "beta" and "zero dimension" in str(err)
    err = _open_error(_patched(tmp_path, data, beta["dims"], "<Q", 128))        # ne0 not a multiple of 256
    assert err.tensor == "beta" and "multiple of its block size 256" in str(err)
    err = _open_error(_patched(tmp_path, data, beta["n_dims"], "<I", 9))
    assert err.tensor == "beta" and "n_dims is 9" in str(err)


def test_duplicates_bad_value_types_and_bad_utf8(tmp_path):
    data = _good_file(tmp_path / "good.gguf")
    w = GGUFWriter()
    w.add_tensor("aa", np.zeros(4, np.float32), (4,), GGMLType.F32)
    w.add_tensor("ab", np.zeros(4, np.float32), (4,), GGMLType.F32)
    w.write(tmp_path / "dup.gguf")
    dup = bytearray((tmp_path / "dup.gguf").read_bytes())
    at = dup.index(b"ab")
    dup[at:at + 2] = b"aa"
    (tmp_path / "dup.gguf").write_bytes(bytes(dup))
    err = _open_error(tmp_path / "dup.gguf")
    assert err.tensor == "aa" and "duplicate tensor name" in str(err)

    vtype_at = data.index(b"test.count") + len("test.count")
    assert "unknown metadata value type 77" in str(_open_error(_patched(tmp_path, data, vtype_at, "<I", 77)))
    etype_at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4
    assert "unknown array element type 55" in str(_open_error(_patched(tmp_path, data, etype_at, "<I", 55)))

    value_at = data.index(b"general.architecture") + len("general.architecture") + 4 + 8   # the value "test"
    bad = bytearray(data)
    bad[value_at] = 0xFF
    (tmp_path / "utf8.gguf").write_bytes(bytes(bad))
    assert "not valid UTF-8" in str(_open_error(tmp_path / "utf8.gguf"))
    tok_at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4 + 8 + 8
    bad = bytearray(data)
    bad[tok_at] = 0xC3                                         # "a" -> a lone UTF-8 lead byte
    (tmp_path / "utf8b.gguf").write_bytes(bytes(bad))
    err = _open_error(tmp_path / "utf8b.gguf")
    assert "'tokenizer.ggml.tokens'" in str(err) and "not valid UTF-8" in str(err)
