"""Hugging Face BitNet checkpoints written with numpy (no torch): a streaming safetensors writer and random
checkpoints of any shape, packed (``quantization_config`` bitnet, uint8 weights + ``weight_scale``) or master
weights (float, ternarized by the loader), sharded or not, with a tokenizer.json.

A packed checkpoint holds the same ternary values and scales as ``testing.models.write_test_model`` with the same
seed and shape (values are drawn per GGUF tensor name by ``testing.models``), and its norms and embedding too
when they are written as F32 / F16: a checkpoint and a GGUF can then be compared tensor for tensor. Master
checkpoints hold N(0, std^2) weights, which the loader ternarizes.

Tensors are produced one at a time (the embedding in row chunks), so the 2B4T shape is written with low memory.
CLI: ``python -m bitnet_batch.testing.hf_writer OUT_DIR --preset tiny|2b4t [--master] [--shards N]``.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import struct
import sys
import time
from typing import Callable, Iterable, Union

import numpy as np

from ..model.hf import hf_name, pack_rows_hf
from . import models

Producer = Callable[[], Union[np.ndarray, Iterable[np.ndarray]]]
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}
#: the BitNet 2B4T chat template of tokenizer_config.json (model_spec.md section 1, variant 1)
HF_CHAT_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                    "message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}{{ content }}"
                    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
_LAYER_ORDER = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_sub_norm", "attn_output", "ffn_norm", "ffn_gate",
                "ffn_up", "ffn_sub_norm", "ffn_down")
PROJ = {"attn_q": "q", "attn_k": "kv", "attn_v": "kv", "attn_output": "o", "ffn_gate": "ff", "ffn_up": "ff",
        "ffn_down": "down"}


def to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """float array -> the bytes' numpy dtype of a safetensors dtype (BF16: rounded to nearest even, as uint16).
    BF16 given as uint16 is taken as bit patterns already (a tensor copied from a file)."""
    if dtype == "BF16" and a.dtype == np.uint16:
        return np.ascontiguousarray(a)
    if dtype == "U8":
        return np.ascontiguousarray(a, np.uint8)
    if dtype == "F32":
        return np.ascontiguousarray(a, "<f4")
    if dtype == "F16":
        return np.ascontiguousarray(a, "<f2")
    if dtype == "BF16":
        bits = np.ascontiguousarray(a, "<f4").view("<u4")
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    raise ValueError(f"to_dtype: unsupported dtype {dtype!r}")


def write_safetensors(path, tensors: dict[str, tuple[str, tuple[int, ...], Producer]],
                      metadata: dict[str, str] | None = None) -> pathlib.Path:
    """Write a safetensors file. ``tensors``: name -> (dtype, shape, producer); the producer returns the tensor
    (or chunks of it, in order) as floats (converted with ``to_dtype``) or, for U8, bytes. Shapes are not checked
    against the data (tests write wrong ones on purpose); only the byte count is."""
    header, pos = {}, 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, (dtype, shape, _) in tensors.items():
        n = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                 # the data section starts 8-byte aligned
    path = pathlib.Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (dtype, shape, produce) in tensors.items():
            data = produce()
            written = 0
            for chunk in ([data] if isinstance(data, np.ndarray) else data):
                b = to_dtype(chunk, dtype).reshape(-1).view(np.uint8)
                f.write(b.data)
                written += b.size
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if written != want:
                raise ValueError(f"{path}: tensor '{name}' got {written} bytes, needs {want}")
    return path


def _tokenizer_files(directory: pathlib.Path, n_vocab: int, tokenizer_from, chat_template: str | None) -> dict:
    """tokenizer.json (+ BOS post-processor), tokenizer_config.json, generation_config.json; returns bos/eos ids."""
    from tokenizers import processors

    from ..tokenizer import tokenizer_from_metadata

    kvs = models.copied_tokenizer(tokenizer_from) if tokenizer_from else models.synthetic_tokenizer(n_vocab)
    tok = tokenizer_from_metadata({k: v for k, (v, _) in kvs.items()}, source="hf_writer")
    bos, eos, eot = tok.bos_id, tok.eos_id, tok.eot_id
    bos_text = tok.token_text(bos)
    tok.hf.post_processor = processors.TemplateProcessing(single=f"{bos_text} $A", pair=f"{bos_text} $A {bos_text} $B",
                                                          special_tokens=[(bos_text, bos)])
    (directory / "tokenizer.json").write_text(tok.hf.to_str(), encoding="utf-8")
    tc = {"bos_token": bos_text, "eos_token": tok.token_text(eos), "clean_up_tokenization_spaces": True,
          "model_max_length": 1000000, "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        tc["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tc, indent=2), encoding="utf-8")
    gen = {"bos_token_id": bos, "eos_token_id": [eos, eot] if eot is not None else eos, "do_sample": False}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return {"bos": bos, "eos": eos, "n_vocab": tok.vocab_size}


def _tensors(spec: dict, fmt: str, seed: int, float_dtype: str, norm_dtype: str, embd_dtype: str,
             scale_dtype: str, linear_class: str, tied: bool, master_std: float) -> dict:
    d, f, v, kv = spec["n_embd"], spec["n_ff"], spec["n_vocab"], spec["n_head_kv"] * spec["n_embd"] // spec["n_head"]
    dims = {"q": (d, d), "kv": (d, kv), "o": (d, d), "ff": (d, f), "down": (f, d)}      # (n_in, n_out)
    out = {}

    def embedding(name):
        return embd_dtype, (v, d), lambda: models.embedding_chunks(seed, name, d, v)
    out[hf_name("token_embd.weight")] = embedding("token_embd.weight")
    out[hf_name("output_norm.weight")] = (norm_dtype, (d,), lambda: models.norm_values(seed, "output_norm.weight", d))
    if not tied:
        out[hf_name("output.weight")] = embedding("output.weight")
    for i in range(spec["n_layer"]):
        for part in _LAYER_ORDER:
            gname = f"blk.{i}.{part}.weight"
            if part not in PROJ:
                n = f if part == "ffn_sub_norm" else d
                out[hf_name(gname)] = (norm_dtype, (n,), lambda g=gname, n=n: models.norm_values(seed, g, n))
                continue
            n_in, n_out = dims[PROJ[part]]
            if fmt == "packed":
                out[hf_name(gname)] = ("U8", (n_out // 4, n_in), lambda g=gname, a=n_in, b=n_out:
                                       pack_rows_hf(models.ternary_values(seed, g, a, b)[0]))
                scale = lambda g=gname, a=n_in: np.array([models.ternary_scale(seed, g, a)], np.float32)  # noqa: E731
                if linear_class == "bitlinear":
                    scale = lambda s=scale: np.float32(1.0) / s()      # noqa: E731 - stored as 1 / alpha
                out[hf_name(gname) + "_scale"] = (scale_dtype, (1,), scale)
            else:
                out[hf_name(gname)] = (float_dtype, (n_out, n_in), lambda g=gname, a=n_in, b=n_out:
                                       models.tensor_rng(seed, g).standard_normal((b, a), np.float32) * master_std)
    return out


def write_checkpoint(directory, *, fmt: str = "packed", n_embd: int = 256, n_layer: int = 2, n_head: int = 4,
                     n_head_kv: int = 2, n_ff: int = 512, n_vocab: int = 512, seed: int = 0,
                     linear_class: str = "bitlinear", shards: int = 1, tied: bool = True, float_dtype: str = "BF16",
                     norm_dtype: str | None = None, embd_dtype: str | None = None, scale_dtype: str | None = None,
                     context_length: int = 1024, rope_theta: float = 500000.0, rms_eps: float = 1e-5,
                     hidden_act: str = "relu2", tokenizer_from=None, chat_template: str | None = HF_CHAT_TEMPLATE,
                     master_std: float | None = None) -> pathlib.Path:
    """Write a random BitNet checkpoint directory (see the module docstring) and return it. ``fmt``: "packed" or
    "master"; float tensors default to ``float_dtype``; with ``tokenizer_from`` (a GGUF) n_vocab is its size."""
    if fmt not in ("packed", "master"):
        raise ValueError(f"fmt must be packed or master, got {fmt!r}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer_files(directory, n_vocab, tokenizer_from, chat_template)
    spec = dict(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff, n_vocab=tok["n_vocab"])
    tensors = _tensors(spec, fmt, seed, float_dtype, norm_dtype or float_dtype, embd_dtype or float_dtype,
                       scale_dtype or float_dtype, linear_class, tied, master_std or 1.0 / math.sqrt(n_embd))
    names = list(tensors)
    if shards == 1:
        write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})
    else:
        per = -(-len(names) // shards)
        wmap, total = {}, 0
        for k in range(shards):
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[k * per:(k + 1) * per]}
            write_safetensors(directory / fname, part, {"format": "pt"})
            wmap.update({n: fname for n in part})
            total += sum(int(np.prod(s)) * ITEMSIZE[dt] for dt, s, _ in part.values())
        index = {"metadata": {"total_size": total}, "weight_map": wmap}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    qc = ({"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline"} if fmt == "packed"
          else {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"})
    config = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_size": n_embd,
              "intermediate_size": n_ff, "num_hidden_layers": n_layer, "num_attention_heads": n_head,
              "num_key_value_heads": n_head_kv, "vocab_size": tok["n_vocab"], "hidden_act": hidden_act,
              "max_position_embeddings": context_length, "rms_norm_eps": rms_eps, "rope_theta": rope_theta,
              "tie_word_embeddings": tied, "attention_bias": False, "bos_token_id": tok["bos"],
              "eos_token_id": tok["eos"], "torch_dtype": "bfloat16", "quantization_config": qc}
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


# ---- CLI ------------------------------------------------------------------------------------------------------

PRESETS = {"tiny": dict(n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512),
           "2b4t": dict(n_embd=2560, n_layer=30, n_head=20, n_head_kv=5, n_ff=6912, context_length=4096)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitnet_batch.testing.hf_writer",
                                description="Write a random Hugging Face BitNet checkpoint (numpy only).")
    p.add_argument("out", help="output directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--master", action="store_true", help="bf16 master weights instead of packed ternary")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-from", help="copy the tokenizer of this GGUF (default for 2b4t: the LLaMA-3 one "
                   "under tests/data/tokenizer)")
    a = p.parse_args(argv)
    shape = dict(PRESETS[a.preset])
    tok = a.tokenizer_from
    if tok is None and a.preset == "2b4t":
        tok = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data" / "tokenizer" / "ggml-vocab-llama-bpe.gguf"
    t0 = time.perf_counter()
    out = write_checkpoint(a.out, fmt="master" if a.master else "packed", shards=a.shards, seed=a.seed,
                           tokenizer_from=tok, **shape)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size:,} bytes) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
