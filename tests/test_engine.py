"""Engine logits vs the reference engines' spec logits; cached decode == uncached; batch invariance."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bitnet_batch
from bitnet_batch.engine.engine import Engine, EngineConfig

REF = Path(__file__).parent / "data" / "reference"
REF_MODELS = ["tiny-i2s-b158", "tiny-tq2_0-bitnet", "tiny-tq1_0-bitnet", "tiny-f32-bitnet"]


@pytest.fixture(scope="module")
def i2s_model():
    return bitnet_batch.load_model(REF / "tiny-i2s-b158.gguf")


@pytest.mark.parametrize("name", REF_MODELS)
def test_logits_pass_reference_check(name, tmp_path):
    side = json.loads((REF / f"{name}.json").read_text())
    model = bitnet_batch.load_model(REF / side["file"])
    assert model.config.ffn_act == side["ffn_activation"]
    sem = np.load(REF / side["logits_files"]["semantic"])
    cand = {}
    for key, seq in side["sequences"].items():
        cand[key] = model.logits(seq["ids"])
        assert cand[key].shape == (seq["length"], side["shapes"]["n_vocab"])
        assert cand[key].dtype == np.float32
        # our engine computes activations in float64 and lands within ~2e-6 of the float64 spec reference,
        # far inside the official tolerance; a larger gap means a numerical regression
        assert np.abs(cand[key] - sem[key]).max() < 1e-3, key
    np.savez(tmp_path / "cand.npz", **cand)
    res = subprocess.run([sys.executable, str(REF / "check_logits.py"), str(REF / f"{name}.json"),
                          str(tmp_path / "cand.npz")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS" in res.stdout


def test_cached_decode_equals_full_prefill(i2s_model):
    """Token-by-token decode through the KV cache gives the logits of one prefill over the sequence."""
    ids = np.array(json.loads((REF / "tiny-i2s-b158.json").read_text())["sequences"]["s3_len300"]["ids"][:100])
    full = i2s_model.logits(ids)
    eng = Engine(i2s_model, EngineConfig(max_batch=2, max_seq_len=128, prefill_chunk=16, block_size=8))
    slot = eng.kv.allocate()
    first = eng.step([(slot, ids[:10].astype(np.int32), 0, True)])[0].copy()
    np.testing.assert_array_equal(first, full[9])
    for p in range(10, len(ids)):
        out = eng.step([(slot, ids[p:p + 1].astype(np.int32), p, True)])[0]
        assert np.abs(out - full[p]).max() <= 1e-3
        np.testing.assert_array_equal(out, full[p])      # same kernels per row: bit-identical


def test_kernel_operands_start_cache_lines(i2s_model):
    """The packed weights, the workspace and the KV cache are cache-line aligned (``jit_kernels.buffers``): the
    AVX2 ternary tile's activation operands and its weight loads then never straddle two lines."""
    eng = Engine(i2s_model, EngineConfig(max_batch=2, max_seq_len=32))
    arrays = {f"ws.{k}": a for k, a in vars(eng.ws).items() if isinstance(a, np.ndarray) and a.size}
    arrays.update({"kv.k": eng.kv.k, "kv.v": eng.kv.v})
    for li, lw in enumerate(i2s_model.weights.layers):
        arrays.update({f"layer {li} {p}": getattr(lw, p).packed for p in ("qkv", "wo", "gate_up", "down")})
    misaligned = [k for k, a in arrays.items() if a.ctypes.data % 64]
    assert not misaligned


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc (Linux)")
def test_prefault_kv_writes_the_pool_once_and_changes_no_logits(i2s_model):
    """prefault_kv: the pool's pages are resident when the engine is built (an engine without it maps them
    lazily), its time is reported, and the logits are the same."""
    cfg = dict(max_batch=2, max_seq_len=64, prefill_chunk=16, block_size=8, kv_cache_mb=64)
    before = _rss_mib()
    lazy = Engine(i2s_model, EngineConfig(**cfg))
    grew_lazy = _rss_mib() - before
    before = _rss_mib()
    eager = Engine(i2s_model, EngineConfig(**cfg, prefault_kv=True))
    grew_eager = _rss_mib() - before
    assert lazy.kv.nbytes == eager.kv.nbytes >= 63 * 2**20
    assert grew_lazy < 16 and grew_eager >= 0.95 * eager.kv.nbytes / 2**20, (grew_lazy, grew_eager)
    assert eager.kv_prefault_s > 0 and lazy.kv_prefault_s == 0
    ids = np.arange(1, 21, dtype=np.int32)
    outs = [e.all_logits(e.kv.allocate(), ids) for e in (lazy, eager)]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_float16_kv_cache(i2s_model):
    """kv_dtype f16: half the KV bytes; cached decode == prefill bit for bit, batch-independent rows, and logits
    near the float32 cache's (every K/V value moves by at most 2^-11 relative)."""
    ids = np.array(json.loads((REF / "tiny-i2s-b158.json").read_text())["sequences"]["s2_len40"]["ids"])
    cfg = EngineConfig(max_batch=2, max_seq_len=64, prefill_chunk=16, block_size=8, kv_dtype="f16")
    eng = Engine(i2s_model, cfg)
    assert eng.kv.k.dtype == np.uint16
    assert eng.kv.nbytes * 2 == Engine(i2s_model, EngineConfig(max_batch=2, max_seq_len=64, prefill_chunk=16,
                                                                block_size=8)).kv.nbytes
    slot = eng.kv.allocate()
    full = eng.all_logits(slot, ids.astype(np.int32))
    eng.kv.free(slot)
    f32 = i2s_model.logits(ids)
    assert 0 < np.abs(full - f32).max() < 2.0                  # f16 rounding moves int8 activations a little
    assert (full.argmax(1) == f32.argmax(1)).mean() >= 0.9
    a, b = eng.kv.allocate(), eng.kv.allocate()
    eng.step([(b, ids[:7].astype(np.int32), 0, False)])
    got = eng.step([(a, ids[:10].astype(np.int32), 0, True), (b, ids[7:9].astype(np.int32), 7, True)])
    np.testing.assert_array_equal(got[0], full[9])
    for p in range(10, len(ids)):
        got = eng.step([(a, ids[p:p + 1].astype(np.int32), p, True), (b, ids[p - 1:p].astype(np.int32), p - 1, True)])
        np.testing.assert_array_equal(got[0], full[p])
    with pytest.raises(Exception, match="kv_dtype must be one of f32, f16"):
        EngineConfig(kv_dtype="int8")


def test_rows_are_independent_of_the_batch(i2s_model):
    """A sequence gets bit-identical logits alone or sharing steps with others (prefill and decode mixed)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 512, 30).astype(np.int32)
    b = rng.integers(0, 512, 45).astype(np.int32)
    alone = i2s_model.logits(a)
    eng = Engine(i2s_model, EngineConfig(max_batch=4, max_seq_len=64, prefill_chunk=64, block_size=16))
    sa, sb = eng.kv.allocate(), eng.kv.allocate()
    eng.step([(sb, b[:20], 0, False)])
    got = eng.step([(sb, b[20:40], 20, True), (sa, a[:12], 0, True)])
    np.testing.assert_array_equal(got[1], alone[11])
    for p in range(12, 30):
        got = eng.step([(sa, a[p:p + 1], p, True), (sb, b[40 + p % 5:41 + p % 5], 40 + p % 5, True)])
        np.testing.assert_array_equal(got[0], alone[p])


def test_ffn_activation_override_changes_the_model():
    silu = bitnet_batch.load_model(REF / "tiny-tq2_0-bitnet.gguf")
    relu = bitnet_batch.load_model(REF / "tiny-tq2_0-bitnet.gguf", ffn_act="relu2")
    assert (silu.config.ffn_act, relu.config.ffn_act) == ("silu", "relu2")
    assert np.abs(silu.logits([1, 2, 3]) - relu.logits([1, 2, 3])).max() > 1e-2


def test_logits_input_checks(i2s_model):
    with pytest.raises(ValueError):
        i2s_model.logits([0, 512])
    with pytest.raises(bitnet_batch.ContextOverflowError):
        i2s_model.logits(np.zeros(i2s_model.config.n_ctx + 1, np.int64))
    assert i2s_model.logits([]).shape == (0, 512)


@pytest.mark.parametrize("wtype", ["i2_s", "tq2_0", "tq1_0", "f16", "bf16", "f32"])
@pytest.mark.parametrize("scale_tensors", [False, True])
def test_every_weight_type_gives_the_same_model(tmp_path, wtype, scale_tensors):
    """The writer stores the same ternary weights in every type (and with separate *.scale tensors):
    the loaded models must agree with the I2_S one."""
    from bitnet_batch.testing.models import write_test_model

    kw = dict(n_embd=256, n_layer=2, n_head=4, n_head_kv=1, n_ff=512, n_vocab=300, seed=11, context_length=256)
    base = bitnet_batch.load_model(write_test_model(tmp_path / "base.gguf", **kw))
    other = bitnet_batch.load_model(write_test_model(tmp_path / f"{wtype}.gguf", weight_type=wtype,
                                                     scale_tensors=scale_tensors, arch="bitnet",
                                                     hidden_activation="relu2", **kw))
    assert other.config.ffn_act == "relu2" and other.config.arch == "bitnet"
    ids = np.arange(1, 40) * 7 % 300
    np.testing.assert_allclose(other.logits(ids), base.logits(ids), atol=1e-4)


def test_step_can_return_every_rows_logits(i2s_model):
    ids = np.arange(3, 40, dtype=np.int32)
    full = i2s_model.logits(ids)
    eng = Engine(i2s_model, EngineConfig(max_batch=2, max_seq_len=64, prefill_chunk=64), logit_rows=64)
    a, b = eng.kv.allocate(), eng.kv.allocate()
    outs = eng.step([(a, ids[:20], 0, "all"), (b, ids[:5], 0, True), (a, ids[20:25], 20, False)])
    np.testing.assert_array_equal(outs[0], full[:20])
    np.testing.assert_array_equal(outs[1], full[4])
    assert outs[2] is None


def test_warm_up_compiles_the_serial_and_the_parallel_drivers(i2s_model):
    """Large steps take the parallel drivers of the row kernels: warm-up compiles them too, so no compilation
    lands inside a timed step. The layers' row kernels are compiled (or loaded) with the layer, both drivers
    in one function; the head's final norm has its own two."""
    from jit_kernels import _config, layer, norms
    from bitnet_batch.engine.warmup import warm_up

    warm_up(Engine(i2s_model, EngineConfig(max_batch=1, max_seq_len=8)))
    for fn in (layer.bitnet_layer, norms._rmsnorm, norms._rmsnorm_serial):
        assert fn.signatures, fn
    assert _config.serial(10)
    with _config.parallel_drivers():
        assert not _config.serial(0)
    assert _config.serial(_config.SERIAL_MAX) and not _config.serial(_config.SERIAL_MAX + 1)


def test_fused_parts_of_odd_size_keep_their_own_rows(tmp_path):
    """A float GGUF may have any FFN width: gate (255 rows) is padded to a row pair inside gate|up, so up starts
    at row 256. Full prefill matches the float64 reference on the loaded ternary weights, and one-row decode
    steps (one matmul over the fused matrix, padding row included) give the same bits as the prefill."""
    import naive
    from bitnet_batch.model.layout import padded_rows, unpack_kernel
    from bitnet_batch.testing.models import write_test_model

    model = bitnet_batch.load_model(write_test_model(tmp_path / "odd.gguf", n_embd=256, n_layer=2, n_head=4,
                                                     n_head_kv=2, n_ff=255, n_vocab=300, weight_type="f32", seed=5))
    cfg, w = model.config, model.weights
    gu = w.layers[0].gate_up
    assert (gu.starts, gu.sizes, gu.packed.shape[0], gu.scale[255]) == ((0, 256), (255, 255), 512, 0.0)

    def parts(proj):
        return [(unpack_kernel(proj.packed[lo:lo + padded_rows(n)], proj.n_in, n), proj.scale[lo:lo + n])
                for lo, n in zip(proj.starts, proj.sizes)]

    layers = []
    for lw in w.layers:
        (q, k, v), (o,), (gate, up), (down,) = parts(lw.qkv), parts(lw.wo), parts(lw.gate_up), parts(lw.down)
        layers.append(dict(attn_norm=lw.attn_norm, q=q, k=k, v=v, o=o, attn_sub_norm=lw.attn_sub_norm,
                           ffn_norm=lw.ffn_norm, gate=gate, up=up, down=down, ffn_sub_norm=lw.ffn_sub_norm))
    ids = np.random.default_rng(1).integers(0, 300, 12).astype(np.int32)
    embd = naive.f16_bits_to_f32(w.tok_embd)
    full = model.logits(ids)
    want = naive.forward(cfg, layers, embd, embd, w.output_norm, ids)
    np.testing.assert_allclose(full, want, rtol=0, atol=1e-3 * np.abs(want).max())
    eng = Engine(model, EngineConfig(max_batch=1, max_seq_len=16, prefill_chunk=16))
    s = eng.kv.allocate()
    eng.step([(s, ids[:6], 0, False)])
    for p in range(6, 12):
        np.testing.assert_array_equal(eng.step([(s, ids[p:p + 1], p, True)])[0], full[p])


def _wrapper_layer(cfg, ws, lw, kc, vc, kv, batch, rt, x):
    """Twin of ``jit_kernels.layer.bitnet_layer``: the layer as the public kernel wrappers compute it, one call
    per kernel from Python (how ``bitnet.forward`` ran before the layer was compiled)."""
    from jit_kernels import activations, attention, rope, ternary
    from bitnet_batch.model import bitnet
    from bitnet_batch.model.layout import padded_rows

    T, H, KVH, hd = x.shape[0], cfg.n_head, cfg.n_head_kv, cfg.head_dim

    def norm_quantize(h, w, proj):
        kp = proj.packed.shape[1] * 4
        xq = ws.xq[:T * kp].reshape(T, kp)
        ternary.norm_quantize_rows(h, w, cfg.rms_eps, xq, ws.xscale, ws.xsum)
        return xq

    def project(h, w, proj, out):
        ternary.ternary_matmul(norm_quantize(h, w, proj), ws.xscale[:T], ws.xsum[:T], proj.packed,
                               proj.scale[:out.shape[1]], out)

    def project_parts(h, w, proj, flat):
        if T == 1:
            out = flat[:proj.n_out].reshape(1, -1)
            project(h, w, proj, out)
            return [out[:, lo:lo + n] for lo, n in zip(proj.starts, proj.sizes)]
        xq = norm_quantize(h, w, proj)
        outs = []
        for lo, n in zip(proj.starts, proj.sizes):
            outs.append(flat[T * lo:T * (lo + n)].reshape(T, n))
            ternary.ternary_matmul(xq, ws.xscale[:T], ws.xsum[:T], proj.packed[lo:lo + padded_rows(n)],
                                   proj.scale[lo:lo + n], outs[-1])
        return outs

    att, proj = ws.att[:T], ws.proj[:T]
    q, k, v = project_parts(x, lw.attn_norm, lw.qkv, ws.qkv)
    q, k, v = q.reshape(T, H, hd), k.reshape(T, KVH, hd), v.reshape(T, KVH, hd)
    rope.rope_neox(q, batch.row_pos, rt.cos, rt.sin)
    rope.rope_neox(k, batch.row_pos, rt.cos, rt.sin)
    attention.kv_write(k, v, kc, vc, kv.block_tables, batch.row_seq, batch.row_pos, ws.att_scratch)
    attention.attention(q, kc, vc, kv.block_tables, batch.row_seq, batch.row_pos, att, ws.att_scratch)
    project(att.reshape(T, cfg.q_dim), lw.attn_sub_norm, lw.wo, proj)
    x += proj
    gate, up = project_parts(x, lw.ffn_norm, lw.gate_up, ws.gate_up)
    activations.gated_activation(gate, up, bitnet._ACT[cfg.ffn_act], gate)
    project(gate, lw.ffn_sub_norm, lw.down, proj)
    x += proj


@pytest.mark.parametrize("kernel", ["avx2", "portable"])
@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
@pytest.mark.parametrize("heads", [(4, 2), (8, 2)])
def test_compiled_layer_gives_the_wrapper_sequence_bits(tmp_path, monkeypatch, kernel, kv_dtype, heads):
    """``bitnet.forward`` runs each layer as one compiled call (``jit_kernels.layer``): its logits are bit for bit
    those of the kernel wrappers called one by one, for prefill chunks of several sequences and one-row decode
    steps, both kernel families, both cache types, the general attention (2 query heads per KV head) and the
    4-head kernel (the 2B4T grouping)."""
    from jit_kernels import _cpu, ternary
    from bitnet_batch.model import bitnet
    from bitnet_batch.testing.models import write_test_model

    if kernel == "avx2" and not _cpu.HAS_AVX2:
        pytest.skip("no AVX2 on this CPU")
    monkeypatch.setattr(bitnet, "KERNEL", kernel)
    monkeypatch.setattr(ternary, "KERNEL", kernel)
    model = bitnet_batch.load_model(write_test_model(tmp_path / "m.gguf", n_embd=256, n_layer=2, n_head=heads[0],
                                                     n_head_kv=heads[1], n_ff=384, n_vocab=300, seed=7))
    engines = [Engine(model, EngineConfig(max_batch=3, max_seq_len=48, prefill_chunk=40, block_size=8,
                                          kv_dtype=kv_dtype)) for _ in range(2)]
    compiled = bitnet.forward

    def wrapper_forward(w, cfg, ws, kv, rt, batch, lm_bf16=None, argmax_head=None, n_argmax=0, argmax_masks=None,
                        argmax_ks=None):
        assert lm_bf16 is None and n_argmax == 0
        T = batch.n_rows
        x = ws.x[:T]
        bitnet.emb_k.embed(batch.tokens, w.tok_embd, w.tok_kind, x)
        for li, lw in enumerate(w.layers):
            _wrapper_layer(cfg, ws, lw, *kv.layer(li), kv, batch, rt, x)
        R = batch.logit_rows.shape[0]
        xl = np.take(x, batch.logit_rows, axis=0)
        bitnet.norms.rmsnorm(xl, w.output_norm, cfg.rms_eps, xl)
        out = ws.logits[:R]
        bitnet.emb_k.lm_head(xl.astype(np.float32), w.output, w.output_kind, ws.lm_scratch, out)
        return out

    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 300, n).astype(np.int32) for n in (13, 5, 20)]
    outs = []
    for eng, fwd in zip(engines, (compiled, wrapper_forward)):
        monkeypatch.setattr("bitnet_batch.engine.engine.forward", fwd)
        slots = [eng.kv.allocate() for _ in prompts]
        got = [eng.step([(s, p, 0, True) for s, p in zip(slots, prompts)])]
        for i in range(4):
            got.append(eng.step([(s, np.array([i + 1], np.int32), len(p) + i, True) for s, p in zip(slots, prompts)]))
            got.append(eng.step([(slots[1], np.array([7], np.int32), len(prompts[1]) + 4 + i, True)]))
        outs.append([np.array(g) for g in got])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
