"""Embedding models and the Embedder: against transformers (tests/data/embed, made by
scripts/make_embedding_reference.py), bit-identical vectors whatever the batching, the GGUF keys and their errors,
text preparation, Matryoshka dimensions, the output quantizers, pooled hidden states of a generative BitNet model,
and the new kernels against their numpy twins."""
import json
from pathlib import Path

import numba
import numpy as np
import pytest

import bitnet_batch
import naive
from bitnet_batch.embeddings import (Embedder, embedding_config, finish, format_query, prepare_tokens,
                                     quantize_binary, quantize_float16, quantize_int8)
from bitnet_batch.errors import ConfigError, ContextOverflowError, InputError, ModelFormatError
from bitnet_batch.model.embedding_models import EmbeddingModelConfig
from bitnet_batch.model.gguf import GGUFFile
from bitnet_batch.testing.embedding_models import (build_embedding_writer, EmbeddingModelSpec,
                                                   write_embedding_test_model)
from bitnet_batch.testing.models import write_test_model
from jit_kernels import attention
from jit_kernels.gelu import gelu_tanh_gated
from jit_kernels.attention import window_attention

DATA = Path(__file__).parent / "data" / "embed"
FIXTURES = ["tiny-qwen3-i2s", "tiny-gemma3-i2s"]
RNG = np.random.default_rng(2121)


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def fixture_models():
    return {name: bitnet_batch.load_model(DATA / f"{name}.gguf") for name in FIXTURES}


# ---- against transformers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embeddings_match_transformers(name, pooling, fixture_models):
    """Every text: cosine >= 0.9999 against transformers in float32 and in float64; where no int8 rounding step
    separates our float64 activations from transformers' float64 run (every sequence but the 201-token Gemma3 one,
    where one activation lands on a rounding step and the change cascades), the two agree to 1e-7."""
    side = json.loads((DATA / f"{name}.json").read_text())
    ref = np.load(DATA / side["embeddings_file"])
    seqs = side["sequences"]
    ours = Embedder(fixture_models[name], max_rows=64, max_texts=4, max_seq_len=256).embed(
        [s["ids"] for s in seqs.values()], pooling=pooling)
    report = []
    for key, vec in zip(seqs, ours):
        for run in ("f32", "f64"):
            r = ref[f"{key}.{pooling}.{run}"]
            c = cosine(vec, r)
            report.append(f"{key} {run}: 1-cos {1 - c:.1e}, max abs {np.abs(vec - r).max():.1e}")
            assert c >= 0.9999, report[-1]
        if not (name == "tiny-gemma3-i2s" and key == "s2_len201"):
            assert np.abs(vec - ref[f"{key}.{pooling}.f64"]).max() < 1e-7, report[-1]
    print(f"\n{name} {pooling}: " + "; ".join(report))


def test_fixture_files_are_the_converter_layout():
    gf = GGUFFile(DATA / "tiny-qwen3-i2s.gguf")
    md, t = gf.metadata, gf.tensors
    assert md["general.architecture"] == "qwen3" and md["qwen3.attention.key_length"] == 96
    assert md["qwen3.pooling_type"] == 3 and md["tokenizer.ggml.add_eos_token"] is True
    assert md["tokenizer.ggml.pre"] == "qwen2" and "output.weight" not in t
    assert t["blk.0.attn_q.weight"].ggml_type == 36 and t["blk.0.attn_q.weight"].shape == (256, 384)
    norm_in = t["blk.2.attn_output_norm_in.weight"]
    assert norm_in.shape == (384,) and norm_in.ggml_type == 1
    g = GGUFFile(DATA / "tiny-gemma3-i2s.gguf")
    assert list(g.metadata["gemma3.attention.sliding_window_pattern"]) == [True, True, False]
    assert "blk.1.post_ffw_norm.weight" in g.tensors


# ---- determinism -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURES)
def test_vectors_are_bit_identical_whatever_the_batching(name, fixture_models):
    """Same vectors (to the bit) for any step size, number of texts per step and order of the texts, including a
    text cut across several steps, for every pooling."""
    model = fixture_models[name]
    rng = np.random.default_rng(7)
    lists = [rng.integers(0, 500, n).tolist() for n in (1, 5, 33, 70, 2, 17)]
    for pooling in ("last", "mean", "cls"):
        base = Embedder(model, max_rows=256, max_texts=8, max_seq_len=128).embed(lists, pooling=pooling)
        for rows, texts in ((7, 2), (16, 1), (40, 3)):
            order = rng.permutation(len(lists))
            got = Embedder(model, max_rows=rows, max_texts=texts, max_seq_len=128).embed(
                [lists[i] for i in order], pooling=pooling)
            np.testing.assert_array_equal(got[np.argsort(order)], base)
        one = [Embedder(model, max_rows=128, max_texts=1, max_seq_len=128).embed([ids], pooling=pooling)[0]
               for ids in lists]
        np.testing.assert_array_equal(np.stack(one), base)


def test_embedder_frees_slots_and_checks_inputs(fixture_models):
    model = fixture_models["tiny-qwen3-i2s"]
    emb = Embedder(model, max_rows=8, max_texts=2, max_seq_len=32)
    emb.embed([[1, 2, 3]] * 9 + [list(range(30))])
    assert emb.kv.free_slots == 2 and emb.steps >= 5 and emb.rows == 9 * 3 + 30
    with pytest.raises(ContextOverflowError, match="token list 1 has 33 tokens"):
        emb.embed([[1], list(range(33))])
    with pytest.raises(ValueError, match="token list 0: ids must be in"):
        emb.embed([[512]])
    with pytest.raises(ValueError, match="non-empty"):
        emb.embed([[]])
    with pytest.raises(ConfigError, match="pooling must be one of"):
        emb.embed([[1]], pooling="max")
    with pytest.raises(ConfigError, match="max_rows"):
        Embedder(model, max_rows=0)
    with pytest.raises(ConfigError, match="embedding model"):
        model.logits([1, 2, 3])


# ---- weights and metadata ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_f32_and_f16_weights_give_the_i2s_vectors(arch, tmp_path):
    """Ternary values stored as F32 / F16 (with the scale) load as the same projections as I2_S: same vectors."""
    preset = {"qwen3": "tiny-qwen3", "gemma3": "tiny-gemma3"}[arch]
    ids = [[3, 9, 27, 81, 243, 510], list(range(1, 40))]
    vecs = {}
    for wtype in ("i2_s", "f32", "f16"):
        path = write_embedding_test_model(tmp_path / f"{wtype}.gguf", preset=preset, weight_type=wtype, seed=5)
        vecs[wtype] = Embedder(bitnet_batch.load_model(path), max_rows=64, max_seq_len=64).embed(ids)
    np.testing.assert_array_equal(vecs["f32"], vecs["i2_s"])
    np.testing.assert_array_equal(vecs["f16"], vecs["i2_s"])


def test_config_reads_the_converter_keys(tmp_path):
    q = bitnet_batch.load_model(write_embedding_test_model(tmp_path / "q.gguf", preset="tiny-qwen3"))
    c = q.config
    assert isinstance(c, EmbeddingModelConfig) and c.head_dim == 96 and c.q_dim == 384 and c.kv_dim == 192
    assert c.attn_scale == pytest.approx(96 ** -0.5) and c.swa_layers == () and c.ffn_act == "silu"
    assert c.pooling == "last" and c.embd_scale == 1.0 and not c.gemma_norms
    g = bitnet_batch.load_model(write_embedding_test_model(tmp_path / "g.gguf", preset="tiny-gemma3"))
    c = g.config
    assert c.swa_layers == (True, True, False) and c.sliding_window == 8 and c.rope_base_swa == 10000.0
    assert c.attn_scale == pytest.approx(0.1) and c.embd_scale == 16.0 and c.ffn_act == "gelu_tanh"
    # Gemma's own norms are stored as offsets from 1; the loader adds 1, the BitLinear norms stay as they are
    gf = GGUFFile(tmp_path / "g.gguf")
    stored = gf.raw("blk.0.attn_norm.weight").view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(g.weights.layers[0].attn_norm, np.float32(1) + stored)
    stored_in = gf.raw("blk.0.attn_q_norm_in.weight").view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(g.weights.layers[0].norm_in["attn_q"], stored_in)
    # the default pattern (period 6) and an explicit per-layer array
    md = dict(gf.metadata)
    md["gemma3.attention.sliding_window_pattern"] = 2
    assert EmbeddingModelConfig.from_metadata(md, "x", n_vocab_tensor=512).swa_layers == (True, False, True)
    del md["gemma3.attention.sliding_window_pattern"]
    assert EmbeddingModelConfig.from_metadata(md, "x", n_vocab_tensor=512).swa_layers == (True, True, True)
    del md["gemma3.attention.sliding_window"]
    assert EmbeddingModelConfig.from_metadata(md, "x", n_vocab_tensor=512).swa_layers == ()


@pytest.mark.parametrize("key,value,message", [
    ("qwen3.attention.value_length", 64, "unequal K/V head widths"),
    ("qwen3.pooling_type", 0, "pooling_type' = 0 .none. is not supported"),
    ("qwen3.attention.key_length", -1, "key_length' must be a positive integer"),
    ("qwen3.embedding_length", None, "missing metadata key 'qwen3.embedding_length'"),
])
def test_config_errors_name_the_key(key, value, message, tmp_path):
    md = dict(GGUFFile(write_embedding_test_model(tmp_path / "q.gguf", preset="tiny-qwen3")).metadata)
    if value is None:
        del md[key]
    else:
        md[key] = value
    with pytest.raises(ModelFormatError, match=message):
        EmbeddingModelConfig.from_metadata(md, tmp_path / "q.gguf", n_vocab_tensor=512)


def test_a_full_precision_model_is_refused_naming_the_tensor(tmp_path):
    """Without the BitLinear input norms the file is a full-precision model (the teacher): not ternary, refused."""
    spec = EmbeddingModelSpec(arch="qwen3", n_embd=256, n_head=4, n_head_kv=2, head_dim=96, n_ff=384, n_layer=1)
    w = build_embedding_writer(spec)
    del w._tensors["blk.0.ffn_up_norm_in.weight"]
    w.write(tmp_path / "teacher.gguf")
    with pytest.raises(ModelFormatError, match="blk.0.ffn_up_norm_in.weight.*not a BitNet embedding model"):
        bitnet_batch.load_model(tmp_path / "teacher.gguf")
    w = build_embedding_writer(spec)
    w._tensors["blk.0.attn_k_norm.weight"] = w._tensors["blk.0.attn_k_norm.weight"].__class__(
        "blk.0.attn_k_norm.weight", (64,), 1, 128, np.zeros(64, np.float16).view(np.uint8))
    w.write(tmp_path / "bad.gguf")
    with pytest.raises(ModelFormatError, match=r"attn_k_norm.weight.*shape \(64,\) but the model needs \(96,\)"):
        bitnet_batch.load_model(tmp_path / "bad.gguf")


# ---- text preparation, finishing, quantizers -----------------------------------------------------------------------

def test_prepare_tokens_follows_the_gguf_flags(fixture_models):
    q, g = fixture_models["tiny-qwen3-i2s"], fixture_models["tiny-gemma3-i2s"]
    qc, gc = embedding_config(q), embedding_config(g)
    assert (qc.pooling, qc.append_eos, qc.add_bos, qc.normalize, qc.dim) == ("last", True, False, True, 256)
    assert (gc.append_eos, gc.add_bos) == (True, True)
    text = "The small town sat at the edge of a wide river."
    body = q.tokenizer.encode(text)
    assert prepare_tokens(q, text, qc) == body + [qc.eos_id]
    assert prepare_tokens(g, text, gc) == [gc.bos_id] + g.tokenizer.encode(text) + [gc.eos_id]
    task = "Given a question, retrieve passages that answer it"
    assert format_query("why?", task) == f"Instruct: {task}\nQuery: why?"
    assert prepare_tokens(q, "why?", qc, instruction=task) == q.tokenizer.encode(format_query("why?", task)) + [
        qc.eos_id]
    with pytest.raises(ContextOverflowError, match="more than the limit 5"):
        prepare_tokens(q, text, qc, max_tokens=5)
    assert prepare_tokens(q, text, qc, max_tokens=5, truncate="right") == body[:4] + [qc.eos_id]
    assert prepare_tokens(q, text, qc, max_tokens=5, truncate="left") == body[-4:] + [qc.eos_id]
    with pytest.raises(InputError, match="instruction"):
        prepare_tokens(q, "x", qc, instruction="  ")


def test_generative_bitnet_defaults_to_mean_pooling(tmp_path):
    m = bitnet_batch.load_model(write_test_model(tmp_path / "b.gguf", n_layer=2))
    c = embedding_config(m)
    assert (c.pooling, c.append_eos, c.query_template, c.embedding_model) == ("mean", False, None, False)


def test_dimensions_truncate_then_normalize():
    v = RNG.standard_normal((3, 16))
    full = finish(v)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1, rtol=1e-6)
    cut = finish(v, dimensions=5)
    np.testing.assert_allclose(cut, v[:, :5] / np.linalg.norm(v[:, :5], axis=1, keepdims=True), rtol=1e-6)
    raw = finish(v, normalize=False, dimensions=4)
    np.testing.assert_array_equal(raw, v[:, :4].astype(np.float32))
    assert finish(np.zeros((1, 4))).tolist() == [[0.0] * 4]
    for bad in (0, 17, 2.5, True):
        with pytest.raises(ConfigError, match="dimensions must be an integer in"):
            finish(v, dimensions=bad)


def test_matryoshka_through_the_embedder(fixture_models):
    emb = Embedder(fixture_models["tiny-qwen3-i2s"], max_rows=64, max_seq_len=64)
    ids = [[5, 6, 7, 510], [9, 510]]
    pooled = emb.pooled(ids, "last")
    np.testing.assert_array_equal(emb.embed(ids, dimensions=64), finish(pooled, dimensions=64))
    assert emb.embed(ids, dimensions=64).shape == (2, 64)


def test_output_quantizers():
    v = np.array([[0.5, -0.25, 0.0, 1e-9, -0.7, 0.1, 0.2, -0.3, 0.4], [0.0] * 9], np.float32)
    h = quantize_float16(v)
    assert h.dtype == np.float16 and h[0, 0] == np.float16(0.5)
    q, s = quantize_int8(v)
    assert q.dtype == np.int8 and s.dtype == np.float32
    assert s[0] == np.float32(0.7) / np.float32(127) and q[0, 4] == -127 and q[0, 0] == np.rint(0.5 / s[0])
    assert s[1] == 0 and not q[1].any()
    np.testing.assert_allclose(q[0] * s[0], v[0], atol=s[0] / 2 + 1e-9)
    b = quantize_binary(v)
    assert b.dtype == np.uint8 and b.shape == (2, 2)
    # bits, most significant first: 1 0 0 1 0 1 1 0 | 1 (then zero padding)
    assert b[0].tolist() == [0b10010110, 0b10000000] and b[1].tolist() == [0, 0]


# ---- pooled hidden states of a generative BitNet model ---------------------------------------------------------

def test_generative_last_hidden_state_gives_the_models_logits(tmp_path):
    """The un-normalised last-token vector of a generative BitNet model is the final normed hidden state the lm_head
    reads: times the embedding matrix it gives the model's own last-position logits."""
    m = bitnet_batch.load_model(write_test_model(tmp_path / "b.gguf", n_layer=2))
    ids = list(range(3, 40))
    emb = Embedder(m, max_rows=16, max_texts=2, max_seq_len=64)
    h = emb.embed([ids, ids[:5]], pooling="last", normalize=False)
    table = m.weights.output.view(np.float16).astype(np.float32)
    np.testing.assert_allclose(h[0] @ table.T, m.logits(ids)[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(h[1] @ table.T, m.logits(ids[:5])[-1], rtol=1e-4, atol=1e-4)
    mean = emb.pooled([ids], "mean")[0]
    other = Embedder(m, max_rows=5, max_texts=1, max_seq_len=64).pooled([ids], "mean")[0]
    np.testing.assert_array_equal(mean, other)


# ---- kernels against numpy twins -------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [3, 700])
def test_gelu_tanh_gated_matches_twin(T):
    g, u = RNG.standard_normal((T, 257)) * 3, RNG.standard_normal((T, 257))
    out = np.zeros_like(g)
    gelu_tanh_gated(g, u, out)
    np.testing.assert_allclose(out, naive.gelu_tanh(g, u), rtol=1e-12, atol=1e-14)
    gelu_tanh_gated(g, u, g)                   # in place
    np.testing.assert_array_equal(g, out)


@pytest.mark.parametrize("cache", [np.float32, np.uint16])
@pytest.mark.parametrize("H,KVH,hd,window", [(4, 2, 32, 0), (4, 1, 16, 5), (2, 2, 16, 1), (6, 3, 8, 40),
                                              (4, 2, 16, 6), (8, 2, 8, 7)])
def test_window_attention_matches_twin(H, KVH, hd, window, cache):
    """Several sequences in one step, positions beyond the window, float32 and float16 caches."""
    lens, bs = [9, 1, 23], 4
    kc, vc, tables = naive.paged_cache(KVH, hd, bs, sum(-(-n // bs) for n in lens) + 2, lens, cache, RNG)
    ks = [RNG.standard_normal((n, KVH, hd)) for n in lens]
    vs = [RNG.standard_normal((n, KVH, hd)) for n in lens]
    if cache == np.uint16:
        ks = [k.astype(np.float16).astype(np.float64) for k in ks]
        vs = [v.astype(np.float16).astype(np.float64) for v in vs]
    else:
        ks = [k.astype(np.float32).astype(np.float64) for k in ks]
        vs = [v.astype(np.float32).astype(np.float64) for v in vs]
    qs = [RNG.standard_normal((n, H, hd)) for n in lens]
    row_seq = np.concatenate([np.full(n, s, np.int32) for s, n in enumerate(lens)])
    row_pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
    scratch = attention.attention_scratch(numba.config.NUMBA_NUM_THREADS, 32, hd, H // KVH)
    attention.kv_write(np.concatenate(ks), np.concatenate(vs), kc, vc, tables, row_seq, row_pos, scratch)
    q = np.concatenate(qs)
    out = np.zeros_like(q)
    window_attention(q, kc, vc, tables, row_seq, row_pos, window, 0.3, out, scratch)
    ref = np.concatenate([naive.causal_attention_window(qs[s], ks[s], vs[s], window, 0.3) for s in range(len(lens))])
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    if window == 0:                             # no window: the engine's attention kernel, same scale
        plain = np.zeros_like(q)
        attention.attention(q, kc, vc, tables, row_seq, row_pos, plain, scratch)
        np.testing.assert_allclose(naive.causal_attention_window(qs[2], ks[2], vs[2], 0, hd ** -0.5),
                                   plain[-23:], rtol=1e-10)
    last = np.zeros((1, H, hd))                 # a lone row gives its row of the batch, to the bit
    window_attention(q[-1:].copy(), kc, vc, tables, np.array([2], np.int32), np.array([22], np.int32), window, 0.3,
                     last, scratch)
    np.testing.assert_array_equal(last[0], out[-1])


def test_inspect_describes_embedding_models():
    from bitnet_batch.inspect import describe, format_description

    info = describe(str(DATA / "tiny-gemma3-i2s.gguf"))
    assert info["embedding"]["pooling"] == "last" and info["embedding"]["sliding_layers"] == [0, 1]
    text = format_description(info)
    assert "no lm_head: embedding model, last pooling, 256 dims" in text
    assert "sliding window 8 on layers [0, 1] (rope base 10000)" in text
    assert "heads 4/1 x 128" in text
