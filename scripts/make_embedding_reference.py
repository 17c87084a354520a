"""Tiny random BitNet embedding models (Qwen3 and Gemma3 backbones) in transformers, written as GGUF the way
bitnet.cpp's converter writes them, with transformers' pooled, normalised embeddings (tests/data/embed).

transformers' ``Qwen3Model`` / ``Gemma3TextModel`` are implementations of the two backbones independent of ours.
This script builds each with small random weights, replaces every projection (q, k, v, o, gate, up, down) by a
BitNet projection -- an RMSNorm with its own weight (the GGUF's ``*_norm_in`` tensor), per-token int8 absmax
activations and the absmean-ternarized weight, as ``docs/bitnet-embeddings-gguf-conversion.md`` describes
BitLinear -- runs token sequences through it in float32 and in float64, and records the last-token and mean
pooled, L2-normalised final hidden states. The float64 run mirrors what the engine stores: the int8 quantizer in
float32 arithmetic (as bitnet.cpp's ``quantize_row_i8_s``) and K / V rounded to float32 (the KV cache); and it
computes in float64 what transformers computes in float32 whatever the model's dtype: the RoPE angles and cos /
sin (``Rope64``), Gemma3's RMSNorms and the attention softmax. ``tests/test_embeddings.py`` compares our engine with them; the tests need
neither torch nor transformers.

The GGUF is what ``utils/convert-bitnet-embedding-to-gguf.py`` writes for ``--outtype i2_s``: the same tensor
names, projections ternarized with its ``quantize_to_i2_s`` rule (scale = mean|w| in float32, q = round(w / scale)
clamped, I2_S blocks with the float32 scale in the tail), every norm and the embedding in F16 (the random values
are drawn at F16 precision so that the file holds the model exactly), Gemma's own norm weights as stored offsets
(transformers multiplies by 1 + w), no output.weight, ``key_length`` / ``value_length``, ``pooling_type`` 3 (last)
and ``add_eos_token``. Two additions the converter does not make, so that the Gemma3 model's attention pattern
and scale reach the file: ``gemma3.attention.sliding_window``, ``.attention.sliding_window_pattern`` (mainline
llama.cpp's keys), ``.rope.freq_base_swa`` and ``.attention.query_pre_attn_scalar``. The vocabulary is the
synthetic 512-token byte-level BPE of ``bitnet_batch.testing`` (token ids are what the comparison uses).

    /work/hfref-venv/bin/python scripts/make_embedding_reference.py --out tests/data/embed
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np                                                     # noqa: E402
import torch                                                           # noqa: E402
import transformers                                                    # noqa: E402
from torch import nn                                                   # noqa: E402
from transformers import Gemma3TextConfig, Gemma3TextModel, Qwen3Config, Qwen3Model   # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitnet_batch.model import quants                                  # noqa: E402
from bitnet_batch.model.gguf import GGMLType, GGUFValueType            # noqa: E402
from bitnet_batch.testing.gguf_writer import GGUFWriter                # noqa: E402
from bitnet_batch.testing.models import synthetic_tokenizer            # noqa: E402

N_VOCAB = 512
EPS = float(np.float32(1e-6))        # the GGUF stores the epsilon as float32: the model as the file holds it
MODELS = {
    "tiny-qwen3-i2s": dict(arch="qwen3", seed=2101, hidden_size=256, intermediate_size=384, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=96, rope_theta=1e6),
    "tiny-gemma3-i2s": dict(arch="gemma3", seed=2102, hidden_size=256, intermediate_size=384, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=128, rope_theta=1e6,
                            rope_local_base_freq=1e4, sliding_window=8, query_pre_attn_scalar=100,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
}
LENGTHS = {"s0_len6": 6, "s1_len40": 40, "s2_len201": 201}
PROJ = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}


def converter_ternarize(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """``quantize_to_i2_s``'s rule (utils/convert-bitnet-embedding-to-gguf.py): float32 mean|w|, round(w / mean)."""
    w_flat = w.reshape(-1).astype(np.float32)
    abs_mean = max(np.mean(np.abs(w_flat)), 1e-5)
    inv_scale = 1.0 / abs_mean
    q = np.round(w_flat * inv_scale).clip(-1, 1)
    return q.reshape(w.shape).astype(np.int8), np.float32(abs_mean)


def converter_i2s_bytes(t: np.ndarray, scale: np.float32) -> np.ndarray:
    """The converter's I2_S packing, transcribed: blocks of 128 codes -> 32 bytes, (c0 << 6) | ... | c3, scale tail."""
    n = t.size
    q = (t.reshape(-1) + 1).astype(np.uint8).reshape(-1, 4, 32)
    packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]
    out = np.zeros(n // 4 + 32, np.uint8)
    out[:n // 4] = packed.reshape(-1)
    out[n // 4:n // 4 + 4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
    return out


class BitLinearRef(nn.Module):
    """The BitNet projection: RMSNorm(x) * norm_in -> per-token int8 absmax fake quant -> x @ (t * scale)^T."""

    def __init__(self, norm_in: np.ndarray, t: np.ndarray, scale: np.float32):
        super().__init__()
        self.norm_in = nn.Parameter(torch.tensor(norm_in), requires_grad=False)
        self.weight = nn.Parameter(torch.tensor(t.astype(np.float32) * scale), requires_grad=False)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * self.norm_in
        if h.dtype == torch.float64:
            # the quantizer in float32 arithmetic, as bitnet.cpp's quantize_row_i8_s (and our engine) computes it:
            # float32 input, s = 127 / absmax and x * s in float32; a float64 quantizer rounds the few values that
            # lie within a float32 rounding error of an int8 step the other way (~1 in 10^6)
            h32 = h.to(torch.float32)
            s = 127.0 / h32.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
            hq = (h32 * s).round().clamp(-128, 127).to(torch.float64) / s.to(torch.float64)
        else:
            s = 127.0 / h.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
            hq = (h * s).round().clamp(-128, 127) / s
        return nn.functional.linear(hq, self.weight)


def f16(a) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def build(name: str, spec: dict):
    """(transformers model in float32, GGUF writer, sidecar info) for one spec."""
    spec = dict(spec)
    arch, seed = spec.pop("arch"), spec.pop("seed")
    rng = np.random.default_rng(seed)
    tok = synthetic_tokenizer(N_VOCAB)
    bos, eos = tok["tokenizer.ggml.bos_token_id"][0], tok["tokenizer.ggml.eos_token_id"][0]
    common = dict(vocab_size=N_VOCAB, rms_norm_eps=EPS, max_position_embeddings=1024, tie_word_embeddings=True,
                  attention_bias=False, bos_token_id=bos, eos_token_id=eos, pad_token_id=None)
    if arch == "qwen3":
        cfg = Qwen3Config(**common, hidden_act="silu", **spec)
        model = Qwen3Model(cfg)
    else:
        cfg = Gemma3TextConfig(**common, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
                               attn_logit_softcapping=None, **spec)
        model = Gemma3TextModel(cfg)
    model.config._attn_implementation = "eager"
    d, hd = cfg.hidden_size, cfg.head_dim
    gemma = arch == "gemma3"
    tensors = {}                                   # GGUF name -> (data, shape, type)

    def norm(n, gguf_name, own=True):
        """A norm weight: multipliers ~ N(1, 0.2) at F16 precision; Gemma's own norms are stored as offsets."""
        mult = f16(np.clip(1 + 0.2 * rng.standard_normal(n), 0.25, 1.75))
        stored = f16(mult - 1) if (gemma and own) else mult
        tensors[gguf_name] = (stored, (n,), GGMLType.F16)
        return stored

    emb = f16(rng.standard_normal((N_VOCAB, d)) * (0.5 if gemma else 4.0) / np.sqrt(d))
    tensors["token_embd.weight"] = (emb, (d, N_VOCAB), GGMLType.F16)
    sd = {"embed_tokens.weight": torch.tensor(emb), "norm.weight": torch.tensor(norm(d, "output_norm.weight"))}
    for i, layer in enumerate(model.layers):
        p = f"blk.{i}."
        sd[f"layers.{i}.input_layernorm.weight"] = torch.tensor(norm(d, p + "attn_norm.weight"))
        sd[f"layers.{i}.self_attn.q_norm.weight"] = torch.tensor(norm(hd, p + "attn_q_norm.weight"))
        sd[f"layers.{i}.self_attn.k_norm.weight"] = torch.tensor(norm(hd, p + "attn_k_norm.weight"))
        if gemma:
            sd[f"layers.{i}.post_attention_layernorm.weight"] = torch.tensor(norm(d, p + "post_attention_norm.weight"))
            sd[f"layers.{i}.pre_feedforward_layernorm.weight"] = torch.tensor(norm(d, p + "ffn_norm.weight"))
            sd[f"layers.{i}.post_feedforward_layernorm.weight"] = torch.tensor(norm(d, p + "post_ffw_norm.weight"))
        else:
            sd[f"layers.{i}.post_attention_layernorm.weight"] = torch.tensor(norm(d, p + "ffn_norm.weight"))
        for hf_name, gguf in PROJ.items():
            parent, attr = hf_name.split(".")
            lin = getattr(getattr(layer, parent), attr)
            n_out, n_in = lin.weight.shape
            master = rng.standard_normal((n_out, n_in)).astype(np.float32) / np.float32(np.sqrt(n_in))
            t, scale = converter_ternarize(master)
            packed = converter_i2s_bytes(t, scale)
            assert np.array_equal(packed, quants.pack_i2s(t, float(scale))), "I2_S packing disagrees"
            tensors[p + gguf + ".weight"] = (packed, (n_in, n_out), GGMLType.I2_S)
            norm_in = norm(n_in, p + gguf + "_norm_in.weight", own=False)
            setattr(getattr(layer, parent), attr, BitLinearRef(norm_in, t, scale))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    left = [m for m in missing if not any(k in m for k in ("norm_in", "proj.weight"))]
    assert not left and not unexpected, (left, unexpected)
    model.eval()
    writer = gguf_writer(name, arch, cfg, tok, tensors)
    return model, writer, cfg, (bos, eos)


def gguf_writer(name, arch, cfg, tok, tensors) -> GGUFWriter:
    """Metadata as ``set_gguf_parameters`` / ``set_vocab`` of the converter write it (plus the Gemma3 keys above)."""
    w = GGUFWriter()
    U32, F32, S, B = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING, GGUFValueType.BOOL
    w.add_kv("general.architecture", arch)
    w.add_kv("general.name", name)
    for key, value in [("block_count", cfg.num_hidden_layers), ("context_length", cfg.max_position_embeddings),
                       ("embedding_length", cfg.hidden_size), ("feed_forward_length", cfg.intermediate_size),
                       ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads), ("vocab_size", cfg.vocab_size),
                       ("rope.dimension_count", cfg.head_dim), ("attention.key_length", cfg.head_dim),
                       ("attention.value_length", cfg.head_dim)]:
        w.add_kv(f"{arch}.{key}", int(value), U32)
    theta = cfg.rope_parameters["full_attention"]["rope_theta"] if arch == "gemma3" else cfg.rope_parameters[
        "rope_theta"]
    w.add_kv(f"{arch}.rope.freq_base", float(theta), F32)
    w.add_kv(f"{arch}.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps), F32)
    w.add_kv("general.file_type", 40, U32)
    w.add_kv(f"{arch}.pooling_type", 3, U32)                            # LAST
    if arch == "gemma3":
        w.add_kv(f"{arch}.attention.sliding_window", int(cfg.sliding_window), U32)
        w.add_kv(f"{arch}.attention.sliding_window_pattern",
                 [t == "sliding_attention" for t in cfg.layer_types], GGUFValueType.BOOL)
        w.add_kv(f"{arch}.rope.freq_base_swa", float(cfg.rope_parameters["sliding_attention"]["rope_theta"]), F32)
        w.add_kv(f"{arch}.attention.query_pre_attn_scalar", float(cfg.query_pre_attn_scalar), F32)
    for key, (value, vtype) in tok.items():
        if key in ("tokenizer.chat_template", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
                   "tokenizer.ggml.pre"):
            continue
        w.add_kv(key, value, vtype)
    w.add_kv("tokenizer.ggml.pre", "qwen2" if arch == "qwen3" else "default", S)
    w.add_kv("tokenizer.ggml.add_bos_token", arch == "gemma3", B)
    w.add_kv("tokenizer.ggml.add_eos_token", True, B)
    for tname, (data, shape, typ) in tensors.items():
        w.add_tensor(tname, data, shape, typ)
    return w


def sequences(arch, bos, eos, seed) -> dict:
    rng = np.random.default_rng(seed)
    head = [bos] if arch == "gemma3" else []
    return {k: head + rng.integers(0, N_VOCAB - 3, n - 1 - len(head)).tolist() + [eos] for k, n in LENGTHS.items()}


def _eager64(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """transformers' eager attention (``eager_attention_forward`` of the Qwen3 / Gemma3 modules) with the softmax in
    the query's dtype: transformers' own takes it in float32 whatever the model's dtype."""
    from transformers.models.qwen3.modeling_qwen3 import repeat_kv

    # K and V as the KV cache stores them (float32)
    k = repeat_kv(key.to(torch.float32).to(query.dtype), module.num_key_value_groups)
    v = repeat_kv(value.to(torch.float32).to(query.dtype), module.num_key_value_groups)
    w = torch.matmul(query, k.transpose(2, 3)) * (module.head_dim ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, :k.shape[-2]]
    w = nn.functional.softmax(w, dim=-1, dtype=query.dtype)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


def _gemma_norm64(self, x):
    """``Gemma3RMSNorm.forward`` in the input's dtype (float64 here) instead of float32."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.to(x.dtype))


class Rope64(nn.Module):
    """transformers' rotary embedding with the angles and cos / sin in float64 (its own computes them in float32
    even for a float64 model: at position 200 that is ~1e-5 rad of error, far more than anything else in a float64
    run). Default RoPE only, as in these models."""

    def __init__(self, cfg, arch):
        super().__init__()
        dim = cfg.head_dim
        if arch == "gemma3":
            bases = {t: p["rope_theta"] for t, p in cfg.rope_parameters.items()}
        else:
            bases = {None: cfg.rope_parameters["rope_theta"]}
        self.inv = {t: 1.0 / (b ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)) for t, b in bases.items()}

    def forward(self, x, position_ids, layer_type=None):
        freqs = position_ids[..., None].to(torch.float64) * self.inv[layer_type]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@torch.no_grad()
def pooled(model, ids, dtype) -> dict:
    model = model.to(dtype)
    if dtype == torch.float64:
        gemma = isinstance(model, Gemma3TextModel)
        model.rotary_emb = Rope64(model.config, "gemma3" if gemma else "qwen3")
        for m in model.modules():
            if type(m).__name__ == "Gemma3RMSNorm":      # computes in float32 whatever the model's dtype
                m.forward = types.MethodType(_gemma_norm64, m)
    import transformers.models.gemma3.modeling_gemma3 as g3
    import transformers.models.qwen3.modeling_qwen3 as q3

    saved = (q3.eager_attention_forward, g3.eager_attention_forward)
    if dtype == torch.float64:
        q3.eager_attention_forward = g3.eager_attention_forward = _eager64
    try:
        h = model(input_ids=torch.tensor([ids])).last_hidden_state[0].to(torch.float64).numpy()
    finally:
        q3.eager_attention_forward, g3.eager_attention_forward = saved
    out = {"last": h[-1], "mean": h.mean(axis=0)}
    return {k: v / np.linalg.norm(v) for k, v in out.items()}


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/embed")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, spec in MODELS.items():
        model, writer, cfg, (bos, eos) = build(name, spec)
        writer.write(out / f"{name}.gguf")
        seqs = sequences(spec["arch"], bos, eos, spec["seed"])
        runs = {label: {k: pooled(model, ids, dt) for k, ids in seqs.items()}
                for label, dt in (("f32", torch.float32), ("f64", torch.float64))}
        arrays = {f"{k}.{pool}.{label}": runs[label][k][pool].astype(np.float32 if label == "f32" else np.float64)
                  for label in runs for k in seqs for pool in ("last", "mean")}
        np.savez(out / f"{name}.transformers.npz", **arrays)
        side = {
            "file": f"{name}.gguf", "arch": spec["arch"], "generator": "scripts/make_embedding_reference.py",
            "reference_engine": f"transformers {transformers.__version__} {type(model).__name__} (torch "
                                f"{torch.__version__}, CPU, eager attention), projections replaced by BitLinearRef",
            "config": {k: v for k, v in spec.items() if k not in ("arch", "seed")} | {"vocab_size": N_VOCAB},
            "seed": spec["seed"], "pooling": "last (the appended EOS) and mean, then L2 normalisation",
            "embeddings_file": f"{name}.transformers.npz",
            "embeddings_format": "npz keys '<sequence>.<last|mean>.<f32|f64>': unit vectors [hidden] "
                                 "(float32 run stored as float32, float64 run as float64)",
            "sequences": {k: {"ids": ids, "length": len(ids)} for k, ids in seqs.items()},
            "f32_vs_f64_cosine": {k: {p: cosine(runs["f32"][k][p], runs["f64"][k][p]) for p in ("last", "mean")}
                                  for k in seqs},
        }
        (out / f"{name}.json").write_text(json.dumps(side, indent=1) + "\n")
        for k in seqs:
            print(name, k, {p: f"{1 - side['f32_vs_f64_cosine'][k][p]:.2e}" for p in ("last", "mean")},
                  "(1 - cosine, transformers f32 vs f64)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
