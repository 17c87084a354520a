"""Random BitNet embedding models (qwen3 / gemma3, as bitnet.cpp's converter lays them out) written as GGUF.

Tensor names, shapes and metadata keys follow ``utils/convert-bitnet-embedding-to-gguf.py`` (see
``bitnet_batch.model.embedding_models``): projections I2_S (or F16 / F32 ternary values), every norm (the seven
``*_norm_in`` per layer included) F16 like the converter's i2_s output, ``token_embd`` F16, no ``output.weight``,
``{arch}.attention.key_length`` / ``value_length``, ``{arch}.pooling_type``. Values come from
``bitnet_batch.testing.models``' per-tensor random streams (ternary P(-1, 0, 1) = (.3, .4, .3), norms ~ N(1, 0.2)),
so a test can regenerate them. Gemma3's own norms are stored as ``w - 1`` (Gemma RMSNorm weights are offsets from
1): the loader's ``1 + w`` then gives the same N(1, 0.2) multipliers.

Presets: ``0.6b`` (BitNet-embedding-0.6B shapes: 28 layers, hidden 1024, 16/8 heads of 128, FFN 3072, vocab
151936) and ``270m`` (18 layers, hidden 640, 4/1 heads of 256, FFN 2048). The vocabulary is the synthetic
byte-level BPE of ``testing.models`` padded to n_vocab (qwen2 pre-tokenizer, EOS appended as the converter sets),
or another GGUF's tokenizer keys (``tokenizer_from``).

CLI: ``python -m bitnet_batch.testing.embedding_models OUT.gguf --preset 0.6b [--wtype i2_s|f16|f32] [--seed N]``.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..model import quants
from ..model.gguf import GGMLType, GGUFValueType
from .gguf_writer import GGUFWriter
from .models import (copied_tokenizer, embedding_chunks, norm_values, synthetic_tokenizer, ternary_values)

PRESETS = {
    "0.6b": dict(arch="qwen3", n_embd=1024, n_layer=28, n_head=16, n_head_kv=8, head_dim=128, n_ff=3072,
                 n_vocab=151936, rope_freq_base=1000000.0),
    "270m": dict(arch="gemma3", n_embd=640, n_layer=18, n_head=4, n_head_kv=1, head_dim=256, n_ff=2048,
                 n_vocab=262144, rope_freq_base=10000.0),
    "tiny-qwen3": dict(arch="qwen3", n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=96, n_ff=384,
                       n_vocab=512, rope_freq_base=1000000.0),
    "tiny-gemma3": dict(arch="gemma3", n_embd=256, n_layer=3, n_head=4, n_head_kv=1, head_dim=128, n_ff=384,
                        n_vocab=512, rope_freq_base=1000000.0, sliding_window=8, swa_pattern=3,
                        query_pre_attn_scalar=100.0),
}
WEIGHT_TYPES = {"i2_s": GGMLType.I2_S, "f16": GGMLType.F16, "f32": GGMLType.F32}
POOLING_IDS = {"mean": 1, "cls": 2, "last": 3}
NORM_IN = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class EmbeddingModelSpec:
    arch: str = "qwen3"
    n_embd: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 96
    n_ff: int = 384
    n_vocab: int = 512
    weight_type: str = "i2_s"
    seed: int = 0
    context_length: int = 32768
    rope_freq_base: float = 1000000.0
    rms_eps: float = 1e-6
    pooling: str = "last"
    sliding_window: int = 0              # gemma3: > 0 writes the sliding-window keys
    swa_pattern: int = 6
    rope_freq_base_swa: float = 10000.0
    query_pre_attn_scalar: float | None = None   # gemma3: None -> key absent

    def __post_init__(self):
        if self.arch not in ("qwen3", "gemma3"):
            raise ConfigError(f"arch must be qwen3 or gemma3, got {self.arch!r}")
        if self.weight_type not in WEIGHT_TYPES:
            raise ConfigError(f"weight_type must be one of {sorted(WEIGHT_TYPES)}, got {self.weight_type!r}")
        if self.pooling not in POOLING_IDS:
            raise ConfigError(f"pooling must be one of {sorted(POOLING_IDS)}, got {self.pooling!r}")
        if self.head_dim % 2 or self.n_head % self.n_head_kv:
            raise ConfigError(f"head_dim must be even and n_head a multiple of n_head_kv, got {self.head_dim}, "
                              f"{self.n_head}/{self.n_head_kv}")
        if self.weight_type == "i2_s":
            for name, k in (("n_embd", self.n_embd), ("n_ff", self.n_ff), ("n_head * head_dim",
                                                                           self.n_head * self.head_dim)):
                if k % 128:
                    raise ConfigError(f"I2_S rows are blocks of 128: {name} must be a multiple of 128, got {k}")

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    def projection_shapes(self) -> dict:
        """ggml shapes (ne0 = in, ne1 = out) of one layer's projections."""
        d, q, kv, f = self.n_embd, self.q_dim, self.kv_dim, self.n_ff
        return {"attn_q": (d, q), "attn_k": (d, kv), "attn_v": (d, kv), "attn_output": (q, d),
                "ffn_gate": (d, f), "ffn_up": (d, f), "ffn_down": (f, d)}

    def norm_lengths(self) -> dict:
        """Norm tensors of one layer (suffix -> length)."""
        d, f = self.n_embd, self.n_ff
        lens = {"attn_norm": d, "attn_q_norm": self.head_dim, "attn_k_norm": self.head_dim, "ffn_norm": d}
        if self.arch == "gemma3":
            lens.update(post_attention_norm=d, post_ffw_norm=d)
        widths = {"attn_q": d, "attn_k": d, "attn_v": d, "attn_output": self.q_dim, "ffn_gate": d, "ffn_up": d,
                  "ffn_down": f}
        lens.update({f"{n}_norm_in": widths[n] for n in NORM_IN})
        return lens


def stored_norm(spec: EmbeddingModelSpec, name: str, n: int) -> np.ndarray:
    """A norm tensor's stored float32 values: N(1, 0.2) multipliers, Gemma's own norms as offsets from 1."""
    w = norm_values(spec.seed, name, n)
    if spec.arch == "gemma3" and "_norm_in" not in name:
        w = w - np.float32(1.0)
    return w.astype(np.float16).astype(np.float32)       # F16 in the file: exact


def _tokenizer_kvs(spec: EmbeddingModelSpec, tokenizer_from) -> dict:
    if tokenizer_from is not None:
        return copied_tokenizer(tokenizer_from)
    kvs = synthetic_tokenizer(min(spec.n_vocab, 4096))
    tokens, types = list(kvs["tokenizer.ggml.tokens"][0]), list(kvs["tokenizer.ggml.token_type"][0])
    pad = spec.n_vocab - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), spec.n_vocab)]
    types += [5] * pad                                                    # UNUSED, as the converter pads
    kvs["tokenizer.ggml.tokens"] = (tokens, GGUFValueType.STRING)
    kvs["tokenizer.ggml.token_type"] = (np.array(types, np.int32), GGUFValueType.INT32)
    kvs["tokenizer.ggml.pre"] = ("qwen2" if spec.arch == "qwen3" else "llama-bpe", GGUFValueType.STRING)
    kvs["tokenizer.ggml.add_bos_token"] = (spec.arch == "gemma3", GGUFValueType.BOOL)
    kvs["tokenizer.ggml.add_eos_token"] = (True, GGUFValueType.BOOL)
    kvs.pop("tokenizer.chat_template", None)
    return kvs


def build_embedding_writer(spec: EmbeddingModelSpec, *, tokenizer_from=None, name: str | None = None) -> GGUFWriter:
    a = spec.arch
    tok = _tokenizer_kvs(spec, tokenizer_from)
    n_vocab = len(tok["tokenizer.ggml.tokens"][0])
    w = GGUFWriter()
    w.add_kv("general.architecture", a)
    w.add_kv("general.name", name or f"test-{a}-embedding-{spec.weight_type}")
    U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    for key, value in [("block_count", spec.n_layer), ("context_length", spec.context_length),
                       ("embedding_length", spec.n_embd), ("feed_forward_length", spec.n_ff),
                       ("attention.head_count", spec.n_head), ("attention.head_count_kv", spec.n_head_kv),
                       ("vocab_size", n_vocab), ("rope.dimension_count", spec.head_dim),
                       ("attention.key_length", spec.head_dim), ("attention.value_length", spec.head_dim)]:
        w.add_kv(f"{a}.{key}", int(value), U32)
    w.add_kv(f"{a}.rope.freq_base", float(spec.rope_freq_base), F32)
    w.add_kv(f"{a}.attention.layer_norm_rms_epsilon", float(spec.rms_eps), F32)
    w.add_kv("general.file_type", {"i2_s": 40, "f16": 1, "f32": 0}[spec.weight_type], U32)
    w.add_kv(f"{a}.pooling_type", POOLING_IDS[spec.pooling], U32)
    if a == "gemma3" and spec.sliding_window:
        w.add_kv(f"{a}.attention.sliding_window", int(spec.sliding_window), U32)
        w.add_kv(f"{a}.attention.sliding_window_pattern", int(spec.swa_pattern), U32)
        w.add_kv(f"{a}.rope.freq_base_swa", float(spec.rope_freq_base_swa), F32)
    if a == "gemma3" and spec.query_pre_attn_scalar is not None:
        w.add_kv(f"{a}.attention.query_pre_attn_scalar", float(spec.query_pre_attn_scalar), F32)
    for key, (value, vtype) in tok.items():
        w.add_kv(key, value, vtype)
    d = spec.n_embd
    w.add_tensor("token_embd.weight", lambda: embedding_chunks(spec.seed, "token_embd.weight", d, n_vocab),
                 (d, n_vocab), GGMLType.F16)
    w.add_tensor("output_norm.weight", lambda: stored_norm(spec, "output_norm.weight", d), (d,), GGMLType.F16)
    wtype = WEIGHT_TYPES[spec.weight_type]
    for i in range(spec.n_layer):
        for part, n in spec.norm_lengths().items():
            nm = f"blk.{i}.{part}.weight"
            w.add_tensor(nm, lambda nm=nm, n=n: stored_norm(spec, nm, n), (n,), GGMLType.F16)
        for part, (ne0, ne1) in spec.projection_shapes().items():
            nm = f"blk.{i}.{part}.weight"
            w.add_tensor(nm, lambda nm=nm, ne0=ne0, ne1=ne1: _projection(spec, nm, ne0, ne1), (ne0, ne1), wtype)
    return w


def _projection(spec, name, ne0, ne1):
    t, scale = ternary_values(spec.seed, name, ne0, ne1)
    if spec.weight_type == "i2_s":
        return quants.pack_i2s(t, scale)
    return t.astype(np.float32) * np.float32(scale)


def write_embedding_test_model(path, *, preset: str | None = None, tokenizer_from=None, name=None,
                               **fields) -> pathlib.Path:
    """Write a random embedding model (``preset`` shapes, ``fields`` override) and return its path."""
    shape = dict(PRESETS[preset]) if preset else {}
    shape.update(fields)
    spec = EmbeddingModelSpec(**shape)
    path = pathlib.Path(path)
    build_embedding_writer(spec, tokenizer_from=tokenizer_from, name=name).write(path)
    return path


def expected_attention_scale(spec: EmbeddingModelSpec) -> float:
    return (spec.query_pre_attn_scalar or spec.head_dim) ** -0.5 if spec.arch == "gemma3" else spec.head_dim ** -0.5


__all__ = ["EmbeddingModelSpec", "PRESETS", "build_embedding_writer", "write_embedding_test_model", "stored_norm",
           "expected_attention_scale"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitnet_batch.testing.embedding_models",
                                description="Write a random BitNet embedding GGUF (qwen3 / gemma3 layout).")
    p.add_argument("out")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny-qwen3")
    p.add_argument("--wtype", dest="weight_type", choices=sorted(WEIGHT_TYPES), default="i2_s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-from", dest="tokenizer_from", help="copy tokenizer.* metadata from this GGUF")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = write_embedding_test_model(a.out, preset=a.preset, weight_type=a.weight_type, seed=a.seed,
                                          tokenizer_from=a.tokenizer_from)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size:,} bytes) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
