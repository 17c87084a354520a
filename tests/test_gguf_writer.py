"""GGUF writer and random test models: round trips through our reader, pip gguf and HF tokenizers."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import gguf as pip_gguf
import numpy as np
import pytest
import tokenizers

from bitnet_batch.errors import ConfigError
from bitnet_batch.model import quants
from bitnet_batch.model.gguf import GGMLType, GGUFFile, GGUFValueType
from bitnet_batch.testing import models
from bitnet_batch.testing.gguf_writer import GGUFWriter

DATA = pathlib.Path(__file__).parent / "data"
REF = DATA / "reference"
TOKENIZER = DATA / "tokenizer" / "ggml-vocab-llama-bpe.gguf"
ROOT = pathlib.Path(__file__).parent.parent
PROJ = models.PROJECTIONS


# ---- the writer ------------------------------------------------------------------------------------------------

def test_kv_types_inferred_and_forced(tmp_path):
    w = GGUFWriter()
    w.add_kv("s", "héllo")
    w.add_kv("b", True)
    w.add_kv("u", 3)
    w.add_kv("neg", -3)
    w.add_kv("big", 2**40)
    w.add_kv("f", 0.5)
    w.add_kv("forced_i32", 5, GGUFValueType.INT32)
    w.add_kv("forced_u64", 5, GGUFValueType.UINT64)
    w.add_kv("forced_f64", 0.1, GGUFValueType.FLOAT64)
    w.add_kv("i64", -2**40, GGUFValueType.INT64)
    w.add_kv("i8", -7, GGUFValueType.INT8)
    w.add_kv("u16", 60000, GGUFValueType.UINT16)
    w.add_kv("strs", ["a", "b c", ""])
    w.add_kv("ints", [1, -2, 3])
    w.add_kv("floats", [1.5, 2])
    w.add_kv("u8s", np.array([1, 2], np.uint8))
    w.add_kv("forced_u32s", [1, 2], GGUFValueType.UINT32)
    w.add_kv("empty", [], GGUFValueType.STRING)
    w.write(tmp_path / "kv.gguf")
    g = GGUFFile(tmp_path / "kv.gguf")
    T = GGUFValueType
    expect = {"s": ("héllo", T.STRING), "b": (True, T.BOOL), "u": (3, T.UINT32), "neg": (-3, T.INT32),
              "big": (2**40, T.UINT64), "f": (0.5, T.FLOAT32), "forced_i32": (5, T.INT32),
              "forced_u64": (5, T.UINT64), "forced_f64": (0.1, T.FLOAT64), "i64": (-2**40, T.INT64),
              "i8": (-7, T.INT8), "u16": (60000, T.UINT16)}
    for key, (value, vtype) in expect.items():
        assert g.metadata[key] == value and type(g.metadata[key]) is type(value), key
        assert g.value_types[key] == (vtype, None), key
    assert g.metadata["strs"] == ["a", "b c", ""] and g.metadata["empty"] == []
    arrays = {"ints": (T.INT32, [1, -2, 3]), "floats": (T.FLOAT32, [1.5, 2.0]), "u8s": (T.UINT8, [1, 2]),
              "forced_u32s": (T.UINT32, [1, 2])}
    for key, (etype, values) in arrays.items():
        assert g.value_types[key] == (T.ARRAY, etype) and g.metadata[key].tolist() == values, key
    with pytest.raises(TypeError, match="empty list"):
        w.add_kv("e2", [])
    with pytest.raises(ValueError, match="duplicate metadata key 's'"):
        w.add_kv("s", "again")


def test_tensors_stream_from_callables_and_chunks(tmp_path):
    calls = []

    def chunks():
        calls.append("chunks")
        for i in range(3):
            yield np.full((2, 256), i, np.float32)

    w = GGUFWriter()
    w.add_tensor("chunked", chunks, (256, 6), GGMLType.F16)
    w.add_tensor("packed", lambda: quants.pack_i2s(np.ones((2, 128), np.int8), 0.5), (128, 2), GGMLType.I2_S)
    w.add_tensor("bf16", np.array([1.0, -2.5, 3.0, 1 + 2**-9], np.float32), (4,), GGMLType.BF16)
    assert calls == []                                          # nothing produced before write()
    w.write(tmp_path / "t.gguf")
    assert calls == ["chunks"]
    g = GGUFFile(tmp_path / "t.gguf")
    got = quants.float_tensor(g.raw("chunked"), GGMLType.F16, (256, 6))
    np.testing.assert_array_equal(got, np.repeat([0.0, 0.0, 1.0, 1.0, 2.0, 2.0], 256).reshape(6, 256))
    t, scale = quants.unpack_i2s(g.raw("packed"), 128, 2)
    assert t.min() == t.max() == 1 and scale == 0.5
    # bf16 rounds to nearest even: 1 + 2^-9 is a tie between 1 and 1 + 2^-7 -> 1
    assert quants.float_tensor(g.raw("bf16"), GGMLType.BF16, (4,)).tolist() == [1.0, -2.5, 3.0, 1.0]
    assert all(info.offset % 32 == 0 for info in g.tensors.values())


def test_writer_rejects_bad_tensors(tmp_path):
    w = GGUFWriter()
    with pytest.raises(ValueError, match="needs 64"):
        w.add_tensor("a", np.zeros(10, np.uint8), (16,), GGMLType.F32)
    with pytest.raises(ValueError, match="multiple of its block size 256"):
        w.add_tensor("a", np.zeros(66, np.uint8), (128, 1), GGMLType.TQ2_0)
    with pytest.raises(TypeError, match="pass packed bytes"):
        w.add_tensor("a", np.zeros(256, np.float32), (256,), GGMLType.TQ2_0)
    w.add_tensor("short", lambda: np.zeros(3, np.float32), (4,), GGMLType.F32)
    with pytest.raises(ValueError, match="producer gave 12 bytes, expected 16"):
        w.write(tmp_path / "short.gguf")
    assert not (tmp_path / "short.gguf").exists()               # no partial file left behind
    w2 = GGUFWriter()
    w2.add_tensor("a", np.zeros(4, np.float32), (4,), GGMLType.F32)
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        w2.add_tensor("a", np.zeros(4, np.float32), (4,), GGMLType.F32)


def test_pip_gguf_reads_our_files(tmp_path):
    """An independent reader agrees with our writer (TQ2_0 weights, F16 embedding, custom alignment)."""
    w = models.build_writer(models.RandomModelSpec(weight_type="tq2_0", n_layer=1, seed=3))
    w.alignment = 64
    w.add_kv("general.alignment", 64, GGUFValueType.UINT32)
    w.write(tmp_path / "m.gguf")
    ours = GGUFFile(tmp_path / "m.gguf")
    theirs = pip_gguf.GGUFReader(tmp_path / "m.gguf")
    assert theirs.alignment == 64 and [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert t.data_offset == info.offset and t.data_offset % 64 == 0
        assert np.asarray(t.data).tobytes() == ours.raw(t.name).tobytes()
    assert theirs.fields["tokenizer.ggml.merges"].contents() == ours.metadata["tokenizer.ggml.merges"]


# ---- random test models ----------------------------------------------------------------------------------------

def _ternary_of(g: GGUFFile, name: str):
    info = g.tensors[name]
    raw, (ne0, ne1) = g.raw(name), info.shape
    if info.ggml_type == GGMLType.I2_S:
        return quants.unpack_i2s(raw, ne0, ne1)
    if info.ggml_type in (GGMLType.TQ1_0, GGMLType.TQ2_0):
        unpack = quants.unpack_tq1_0 if info.ggml_type == GGMLType.TQ1_0 else quants.unpack_tq2_0
        t, d = unpack(raw, ne0, ne1)
        assert np.all(d == d[0, 0]), name                       # every block's d = the tensor scale
        return t, float(d[0, 0])
    w = quants.float_tensor(raw, info.ggml_type, info.shape)
    scale = float(np.abs(w).max())
    return np.rint(w / scale).astype(np.int8), scale


@pytest.mark.parametrize("wtype", sorted(models.WEIGHT_TYPES))
def test_model_round_trip_every_weight_type(tmp_path, wtype):
    seed = 11
    path = models.write_test_model(tmp_path / f"{wtype}.gguf", weight_type=wtype, n_layer=2, seed=seed,
                                   embd_type="f32" if wtype == "f32" else "f16")
    g = GGUFFile(path)
    arch = "bitnet-b1.58"
    md = g.metadata
    assert md["general.architecture"] == arch and md["general.file_type"] == models.FILE_TYPES[wtype]
    assert (md[f"{arch}.block_count"], md[f"{arch}.embedding_length"], md[f"{arch}.vocab_size"]) == (2, 256, 512)
    assert md[f"{arch}.rope.dimension_count"] == 64 and md[f"{arch}.attention.head_count_kv"] == 2
    assert f"{arch}.hidden_activation" not in md and "output.weight" not in g.tensors
    for i in range(2):
        for part in PROJ:
            name = f"blk.{i}.{part}.weight"
            info = g.tensors[name]
            assert info.ggml_type == models.WEIGHT_TYPES[wtype]
            t, scale = _ternary_of(g, name)
            t_exp, scale_exp = models.ternary_values(seed, name, *info.shape)
            np.testing.assert_array_equal(t, t_exp, err_msg=name)
            assert scale == pytest.approx(scale_exp, rel=0, abs=0), name   # bf16-exact scale survives every type
        for part, n in (("attn_norm", 256), ("attn_sub_norm", 256), ("ffn_norm", 256), ("ffn_sub_norm", 512)):
            name = f"blk.{i}.{part}.weight"
            got = quants.float_tensor(g.raw(name), GGMLType.F32, (n,))
            np.testing.assert_array_equal(got, models.norm_values(seed, name, n))
    emb_info = g.tensors["token_embd.weight"]
    emb = quants.float_tensor(g.raw("token_embd.weight"), emb_info.ggml_type, emb_info.shape)
    expect = models.embedding_values(seed, "token_embd.weight", 256, 512)
    np.testing.assert_array_equal(emb, expect if wtype == "f32" else expect.astype(np.float16).astype(np.float32))


def test_layout_matches_reference_model(tmp_path):
    ref = GGUFFile(REF / "tiny-i2s-b158.gguf")
    g = GGUFFile(models.write_test_model(tmp_path / "m.gguf"))        # defaults = the tiny reference shape
    assert list(g.tensors) == list(ref.tensors)
    for name, info in ref.tensors.items():
        assert (g.tensors[name].shape, g.tensors[name].ggml_type, g.tensors[name].nbytes) == \
            (info.shape, info.ggml_type, info.nbytes), name
    arch_keys = [k for k in ref.metadata if k.startswith("bitnet-b1.58.")]
    for k in arch_keys + ["general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.pre"]:
        assert g.metadata[k] == ref.metadata[k] and g.value_types[k] == ref.value_types[k], k


def test_scale_tensors_untied_and_hidden_activation(tmp_path):
    path = models.write_test_model(tmp_path / "m.gguf", arch="bitnet", weight_type="f16", scale_tensors=True,
                                   tied=False, hidden_activation="relu2", n_layer=1, seed=5)
    g = GGUFFile(path)
    assert g.metadata["bitnet.hidden_activation"] == "relu2"
    out = g.tensors["output.weight"]
    assert out.ggml_type == GGMLType.F16 and out.shape == (256, 512)
    np.testing.assert_array_equal(quants.float_tensor(g.raw("output.weight"), GGMLType.F16, out.shape),
                                  models.embedding_values(5, "output.weight", 256, 512).astype(np.float16))
    for part in PROJ:
        name = f"blk.0.{part}.weight"
        w = quants.float_tensor(g.raw(name), GGMLType.F16, g.tensors[name].shape)
        t, scale = models.ternary_values(5, name, *g.tensors[name].shape)
        np.testing.assert_array_equal(w, t)                       # plain ternary values
        s_info = g.tensors[f"blk.0.{part}.scale"]
        assert s_info.shape == (1,) and s_info.ggml_type == GGMLType.F32
        assert quants.float_tensor(g.raw(s_info.name), GGMLType.F32, (1,))[0] == np.float32(scale)
        assert models.ternary_scale(5, name, g.tensors[name].shape[0]) == scale
    names = list(g.tensors)
    assert names.index("blk.0.attn_q.scale") == names.index("blk.0.attn_q.weight") + 1


def test_i2s_scale_tensors_give_unit_tail_scale(tmp_path):
    g = GGUFFile(models.write_test_model(tmp_path / "m.gguf", scale_tensors=True, n_layer=1))
    _, scale = quants.unpack_i2s(g.raw("blk.0.ffn_up.weight"), 256, 512)
    assert scale == 1.0 and "blk.0.ffn_up.scale" in g.tensors


def test_shapes_and_seeds(tmp_path):
    g = GGUFFile(models.write_test_model(tmp_path / "m.gguf", n_embd=384, n_head=6, n_head_kv=3, n_ff=640,
                                         n_layer=1, n_vocab=300, seed=1))
    assert g.tensors["blk.0.attn_k.weight"].shape == (384, 192)
    assert g.tensors["blk.0.ffn_down.weight"].shape == (640, 384)
    assert g.tensors["token_embd.weight"].shape == (384, 300)
    a = models.ternary_values(1, "blk.0.attn_q.weight", 384, 384)
    b = models.ternary_values(2, "blk.0.attn_q.weight", 384, 384)
    c = models.ternary_values(1, "blk.0.attn_k.weight", 384, 384)
    assert not np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    counts = np.array([(a[0] == v).mean() for v in (-1, 0, 1)])
    assert np.all(np.abs(counts - [0.3, 0.4, 0.3]) < 0.02)
    assert 0.5 / np.sqrt(384) <= a[1] <= 2.0 / np.sqrt(384)


def test_refusals():
    with pytest.raises(ConfigError, match="n_embd must be a multiple of 128, got 192"):
        models.RandomModelSpec(n_embd=192, n_head=3, n_head_kv=1)
    with pytest.raises(ConfigError, match="n_ff must be a multiple of 256, got 384"):
        models.RandomModelSpec(weight_type="tq1_0", n_ff=384)
    models.RandomModelSpec(weight_type="f16", n_embd=192, n_head=3, n_head_kv=1, n_ff=100)   # floats: any shape
    with pytest.raises(ConfigError, match="weight_type must be one of"):
        models.RandomModelSpec(weight_type="q4_0")
    with pytest.raises(ConfigError, match="n_head must be a multiple of n_head_kv"):
        models.RandomModelSpec(n_head=4, n_head_kv=3)
    with pytest.raises(ConfigError, match="n_layer must be a positive integer, got 0"):
        models.RandomModelSpec(n_layer=0)
    with pytest.raises(ConfigError, match="n_vocab must be >= 264"):
        models.synthetic_tokenizer(260)


# ---- synthetic tokenizer ---------------------------------------------------------------------------------------

def test_synthetic_tokenizer_vocabulary():
    kv = models.synthetic_tokenizer(512)
    tokens, types = kv["tokenizer.ggml.tokens"][0], kv["tokenizer.ggml.token_type"][0]
    merges = kv["tokenizer.ggml.merges"][0]
    assert len(tokens) == 512 == len(set(tokens)) == len(types)
    assert tokens[:256] == list(models.bytes_to_unicode().values()) and tokens[0] == "!"
    assert tokens[-3:] == ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    assert types[:-3].tolist() == [1] * 509 and types[-3:].tolist() == [3, 3, 3]
    assert [kv[f"tokenizer.ggml.{k}_token_id"][0] for k in ("bos", "eos", "eot")] == [509, 510, 511]
    assert kv["tokenizer.ggml.add_bos_token"][0] is True and kv["tokenizer.chat_template"][0] == models.CHAT_TEMPLATE
    vocab = set(tokens)
    for m in merges:
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab, m
    assert merges[0] == "Ġ t" and "Ġthe" in tokens[256:300]
    again = models.synthetic_tokenizer(512)                      # deterministic
    assert again["tokenizer.ggml.tokens"][0] == tokens and again["tokenizer.ggml.merges"][0] == merges


def test_synthetic_tokenizer_pads_large_vocab_with_reserved_tokens():
    n_merges = len(models.learn_merges())
    kv = models.synthetic_tokenizer(n_merges + 300)
    tokens, types = kv["tokenizer.ggml.tokens"][0], kv["tokenizer.ggml.token_type"][0]
    assert len(tokens) == len(set(tokens)) == n_merges + 300
    n_normal = int((types == 1).sum())
    assert tokens[n_normal] == "<|reserved_special_token_0|>" and np.all(types[n_normal:] == 3)
    assert tokens[-1] == "<|eot_id|>"


def test_synthetic_tokenizer_works_with_hf_tokenizers():
    kv = models.synthetic_tokenizer(700)
    tokens = kv["tokenizer.ggml.tokens"][0]
    merges = [tuple(m.split(" ")) for m in kv["tokenizer.ggml.merges"][0]]
    bpe = tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges)
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tokenizers.decoders.ByteLevel()
    text = "The library opened at dawn, and the students were there. Ünïcode ✓ 2024!"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) * 0.6                   # merges compress English
    assert tokens.index("Ġthe") in ids


def test_tokenizer_from_copies_llama3_vocab(tmp_path):
    path = models.write_test_model(tmp_path / "m.gguf", n_embd=128, n_head=2, n_head_kv=1, n_ff=256, n_layer=1,
                                   tokenizer_from=TOKENIZER)
    g, src = GGUFFile(path), GGUFFile(TOKENIZER)
    assert g.metadata["bitnet-b1.58.vocab_size"] == 128256
    assert g.tensors["token_embd.weight"].shape == (128, 128256)
    for k, v in src.metadata.items():
        if k.startswith("tokenizer."):
            assert g.value_types[k] == src.value_types[k], k
            assert (v.tolist() if isinstance(v, np.ndarray) else v) == \
                (g.metadata[k].tolist() if isinstance(g.metadata[k], np.ndarray) else g.metadata[k]), k


# ---- the model is sane -----------------------------------------------------------------------------------------

def _rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w


def _float_forward(g: GGUFFile, ids):
    """Float64 BitNet b1.58 forward (no activation quantization; RoPE omitted: magnitudes only)."""
    md, a = g.metadata, g.metadata["general.architecture"]
    n_head, n_kv = md[f"{a}.attention.head_count"], md[f"{a}.attention.head_count_kv"]

    def mat(name):
        t, s = _ternary_of(g, name)
        return t * s

    def vec(name):
        return quants.float_tensor(g.raw(name), GGMLType.F32, g.tensors[name].shape)

    info = g.tensors["token_embd.weight"]
    emb = quants.float_tensor(g.raw(info.name), info.ggml_type, info.shape).astype(np.float64)
    x = emb[ids]
    T, D = x.shape
    hd = D // n_head
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(md[f"{a}.block_count"]):
        p = f"blk.{i}."
        h = _rms(x, vec(p + "attn_norm.weight"))
        q = (h @ mat(p + "attn_q.weight").T).reshape(T, n_head, hd)
        k = np.repeat((h @ mat(p + "attn_k.weight").T).reshape(T, n_kv, hd), n_head // n_kv, axis=1)
        v = np.repeat((h @ mat(p + "attn_v.weight").T).reshape(T, n_kv, hd), n_head // n_kv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        pr = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("hts,shd->thd", pr / pr.sum(-1, keepdims=True), v).reshape(T, D)
        x = x + _rms(o, vec(p + "attn_sub_norm.weight")) @ mat(p + "attn_output.weight").T
        h = _rms(x, vec(p + "ffn_norm.weight"))
        f = np.maximum(h @ mat(p + "ffn_gate.weight").T, 0) ** 2 * (h @ mat(p + "ffn_up.weight").T)
        x = x + _rms(f, vec(p + "ffn_sub_norm.weight")) @ mat(p + "ffn_down.weight").T
    return _rms(x, vec("output_norm.weight")) @ emb.T


def test_random_model_has_sane_logits_like_the_reference(tmp_path):
    ids = [1, 50, 300, 7, 99, 255, 3, 400]
    ours = _float_forward(GGUFFile(models.write_test_model(tmp_path / "m.gguf", seed=4)), ids)
    ref = _float_forward(GGUFFile(REF / "tiny-i2s-b158.gguf"), ids)
    for logits in (ours, ref):
        assert np.all(np.isfinite(logits))
        assert 1.0 < logits.std() < 10.0 and 3.0 < np.abs(logits).max() < 40.0
    assert 0.5 < ours.std() / ref.std() < 2.0


# ---- CLI ------------------------------------------------------------------------------------------------------

def test_cli_in_process(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert models.main([str(out), "--preset", "tiny", "--layers", "1", "--wtype", "tq2_0", "--seed", "9",
                        "--vocab", "300", "--name", "cli-model"]) == 0
    assert "wrote" in capsys.readouterr().out
    g = GGUFFile(out)
    assert g.metadata["general.name"] == "cli-model" and g.metadata["bitnet-b1.58.vocab_size"] == 300
    assert g.tensors["blk.0.ffn_gate.weight"].ggml_type == GGMLType.TQ2_0
    t, _ = _ternary_of(g, "blk.0.ffn_gate.weight")
    np.testing.assert_array_equal(t, models.ternary_values(9, "blk.0.ffn_gate.weight", 256, 512)[0])
    assert models.main([str(tmp_path / "bad.gguf"), "--hidden", "200"]) == 2
    assert "multiple of 128" in capsys.readouterr().err


def test_cli_subprocess(tmp_path):
    out = tmp_path / "sub.gguf"
    r = subprocess.run([sys.executable, "-m", "bitnet_batch.testing.models", str(out), "--hidden", "128",
                        "--heads", "2", "--kv-heads", "1", "--ffn", "256", "--layers", "1", "--vocab", "270"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert GGUFFile(out).tensors["blk.0.ffn_down.weight"].shape == (256, 128)
