"""Tiny random BitNet checkpoints in both Hugging Face formats, with transformers' logits for them (tests/data/hf).

transformers' ``BitNetForCausalLM`` is an implementation of the forward pass independent of ours. This script
builds two tiny random models with torch, saves them the way the Hub checkpoints are stored, loads them back
through ``BitNetForCausalLM.from_pretrained`` (so transformers' own quantizer reads the files) and records
transformers' logits for a few token sequences. ``tests/test_hf.py`` compares our engine's logits with them, for
the directory and for its converted GGUFs; the tests need neither torch nor transformers.

- ``tiny-packed-gqa``: the packed offline format of ``microsoft/bitnet-b1.58-2B-4T`` (``quantization_config``
  bitnet / bitlinear / offline: uint8 weights packed with transformers' own ``pack_weights``, bf16
  ``weight_scale`` = 1 / mean|W|, bf16 norms and embedding), odd sizes (hidden 320, 5 heads of 64 over 1 KV
  head, FFN 864), 3 layers, tied lm_head.
- ``tiny-master-mha``: bf16 master weights as in ``microsoft/bitnet-b1.58-2B-4T-bf16`` (bitnet / autobitlinear /
  online: transformers ternarizes them at every forward), hidden 256, 4 heads = 4 KV heads, FFN 256, 2 layers,
  a separate lm_head.

Both relu2, rope theta 500000, rms eps 1e-5, the synthetic 512-token byte-level BPE of ``bitnet_batch.testing``
(LLaMA-3 split regex) saved by transformers' ``PreTrainedTokenizerFast`` with the BitNet chat template.

Logits: float32 (the pass-rule target, every sequence), float64 (sequences up to 40 tokens: a tight check, since
our engine keeps activations in float64) and, reported only, bfloat16 (transformers' default dtype for these
checkpoints) to measure that systematic difference. A sequence's tier follows the shared reference's rule: strict
where two independent runs (transformers in float32 and in float64) agree within the strict tolerance with the
same top-1 token everywhere, cascade where per-token int8 rounding flips already separate them.

    python -m venv --system-site-packages /tmp/hfref && /tmp/hfref/bin/pip install torch==2.13.0 transformers accelerate
    TORCHDYNAMO_DISABLE=1 /tmp/hfref/bin/python scripts/make_hf_reference.py --out tests/data/hf
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")     # transformers' BitLinear helpers are @torch.compile'd

import numpy as np                                     # noqa: E402
import torch                                           # noqa: E402
import transformers                                    # noqa: E402
from safetensors.torch import save_file                # noqa: E402
from transformers import BitNetConfig, BitNetForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from transformers.integrations.bitnet import AutoBitLinear, BitLinear, pack_weights  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitnet_batch.testing.hf_writer import HF_CHAT_TEMPLATE  # noqa: E402
from bitnet_batch.testing.models import synthetic_tokenizer  # noqa: E402
from bitnet_batch.tokenizer import tokenizer_from_metadata  # noqa: E402

N_VOCAB = 512
MODELS = {
    "tiny-packed-gqa": dict(fmt="packed", seed=1801, hidden_size=320, num_hidden_layers=3, num_attention_heads=5,
                            num_key_value_heads=1, intermediate_size=864, tie_word_embeddings=True),
    "tiny-master-mha": dict(fmt="master", seed=1802, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, intermediate_size=256, tie_word_embeddings=False),
}
LENGTHS = {"s0_len1": 1, "s1_len8": 8, "s2_len16": 16, "s3_len40": 40, "s4_len210": 210}
F64_MAX_LEN = 40            # float64 logits are stored for sequences up to this length (fixture size)
TOL = 0.02                  # the strict tier's max abs difference (../shared/reference/README.md)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANT = {"packed": {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"},
         "master": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}}


def save_tokenizer(out: Path):
    """The synthetic vocabulary as a transformers fast tokenizer (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import processors

    kvs = synthetic_tokenizer(N_VOCAB)
    tok = tokenizer_from_metadata({k: v for k, (v, _) in kvs.items()}, source="synthetic")
    bos, eos = tok.token_text(tok.bos_id), tok.token_text(tok.eos_id)
    tok.hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.hf, bos_token=bos, eos_token=eos)
    fast.chat_template = HF_CHAT_TEMPLATE
    fast.save_pretrained(out)
    return tok


def random_state(cfg: BitNetConfig, seed: int) -> dict[str, torch.Tensor]:
    """float32 weights: embeddings N(0, (4/sqrt(D))^2) (logits of a few units), norms N(1, 0.2^2), projections
    N(0, 1/in)."""
    g = torch.Generator().manual_seed(seed)
    model = BitNetForCausalLM(cfg)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            state[name] = (1 + 0.2 * torch.randn(p.shape, generator=g)).clamp(0.25, 1.75)
        elif "embed_tokens" in name or name == "lm_head.weight":
            state[name] = torch.randn(p.shape, generator=g) * 4 / cfg.hidden_size ** 0.5
        else:
            state[name] = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def packed_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Projections -> transformers' packed offline format (BitLinear): uint8 weight + bf16 weight_scale = 1/alpha."""
    out = {}
    for name, w in state.items():
        if any(f".{p}." in name for p in PROJECTIONS):
            alpha = w.abs().mean().clamp(min=1e-5)
            t = (w / alpha).round().clamp(-1, 1)
            out[name] = pack_weights(t.clone())
            out[name + "_scale"] = (1.0 / alpha).reshape(1).to(torch.bfloat16)
        else:
            out[name] = w.to(torch.bfloat16)
    return out


def build(name: str, spec: dict, out: Path, tok) -> tuple[Path, BitNetConfig]:
    spec = dict(spec)
    fmt, seed = spec.pop("fmt"), spec.pop("seed")
    cfg = BitNetConfig(vocab_size=N_VOCAB, max_position_embeddings=512, rms_norm_eps=1e-5, hidden_act="relu2",
                       bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **spec)
    path = out / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    state = random_state(cfg, seed)
    state = packed_state(state) if fmt == "packed" else {k: v.to(torch.bfloat16) for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = QUANT[fmt]
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_tokenizer(path)
    return path, cfg


def load(path: Path, dtype):
    model = BitNetForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, (BitLinear, AutoBitLinear))}
    n = sum(isinstance(m, (BitLinear, AutoBitLinear)) for m in model.modules())
    assert n == 7 * model.config.num_hidden_layers, f"{path}: {n} BitNet linear layers ({kinds})"
    return model, kinds


@torch.no_grad()
def logits(model, ids) -> np.ndarray:
    return model(input_ids=torch.tensor([ids])).logits[0].to(torch.float64).numpy()


def sequences(bos: int, seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    return {key: [bos] + rng.integers(0, N_VOCAB, n - 1).tolist() for key, n in LENGTHS.items()}


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    return {"max_abs": float(np.abs(a - b).max()), "mean_abs": float(np.abs(a - b).mean()),
            "top1": float((a.argmax(-1) == b.argmax(-1)).mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/hf")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = save_tokenizer(out / ".tok")
    shutil.rmtree(out / ".tok")
    for name, spec in MODELS.items():
        path, cfg = build(name, spec, out, tok)
        seqs = sequences(tok.bos_id, spec["seed"])
        runs, kinds = {}, set()
        for label, dtype in (("f32", torch.float32), ("f64", torch.float64), ("bf16", torch.bfloat16)):
            model, kinds = load(path, dtype)
            runs[label] = {k: logits(model, ids) for k, ids in seqs.items()}
        np.savez(out / f"{name}.transformers-f32.npz", **{k: v.astype(np.float32) for k, v in runs["f32"].items()})
        short = [k for k, n in LENGTHS.items() if n <= F64_MAX_LEN]
        np.savez(out / f"{name}.transformers-f64.npz", **{k: runs["f64"][k].astype(np.float32) for k in short})
        metrics = {k: {"f64_vs_f32": compare(runs["f64"][k], runs["f32"][k]),
                       "bf16_vs_f32": compare(runs["bf16"][k], runs["f32"][k])} for k in seqs}
        tiers = {k: "strict" if m["f64_vs_f32"]["max_abs"] <= TOL and m["f64_vs_f32"]["top1"] == 1.0 else "cascade"
                 for k, m in metrics.items()}
        side = {
            "file": name, "format": spec["fmt"], "arch": "bitnet (Hugging Face)", "weight_type": spec["fmt"],
            "ffn_activation": "relu2", "quantization_config": QUANT[spec["fmt"]], "linear_classes": sorted(kinds),
            "shapes": {k: v for k, v in spec.items() if k not in ("fmt", "seed")} | {"vocab_size": N_VOCAB},
            "seed": spec["seed"], "generator": "scripts/make_hf_reference.py",
            "reference_engine": {"name": f"transformers {transformers.__version__} BitNetForCausalLM "
                                         f"(torch {torch.__version__}, CPU, eager, TORCHDYNAMO_DISABLE=1)",
                                 "dtype": "float32"},
            "logits_files": {"engine": f"{name}.transformers-f32.npz", "semantic": f"{name}.transformers-f32.npz",
                             "float64": f"{name}.transformers-f64.npz"},
            "logits_format": f"npz, one key per sequence, float32 [T, n_vocab], all positions (float64 run: "
                             f"sequences up to {F64_MAX_LEN} tokens)",
            "tolerance": {"max_abs": TOL},
            "tier_rule": "strict where transformers float32 and float64 agree (max abs <= tolerance, same top-1 "
                         "everywhere), else cascade",
            "sequences": {k: {"ids": ids, "length": len(ids), "tier": tiers[k]} for k, ids in seqs.items()},
            "metrics": metrics,
        }
        (out / f"{name}.json").write_text(json.dumps(side, indent=1) + "\n")
        for k in seqs:
            m = side["metrics"][k]
            print(f"{name} {k} [{tiers[k]}]: f64 vs f32 max {m['f64_vs_f32']['max_abs']:.2e} | bf16 vs f32 max "
                  f"{m['bf16_vs_f32']['max_abs']:.3f} mean {m['bf16_vs_f32']['mean_abs']:.3f} "
                  f"top1 {m['bf16_vs_f32']['top1']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
