"""Typed, validated configuration read from GGUF metadata (ModelConfig) and given by the user (EngineConfig;
the sampling parameters are ``sampling.params.SamplingParams``, a job's ``jobs.run.JobConfig``).

GGUF keys are read through the named constants below, prefixed by the architecture name.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, ModelFormatError

SUPPORTED_ARCHS = ("bitnet-b1.58", "bitnet-25", "bitnet")

KEY_ARCH = "general.architecture"
KEY_NAME = "general.name"
# per-architecture keys: f"{arch}.{suffix}"
K_VOCAB = "vocab_size"
K_CONTEXT = "context_length"
K_EMBD = "embedding_length"
K_LAYERS = "block_count"
K_FF = "feed_forward_length"
K_HEADS = "attention.head_count"
K_HEADS_KV = "attention.head_count_kv"
K_EPS = "attention.layer_norm_rms_epsilon"
K_ROPE_BASE = "rope.freq_base"
K_ROPE_DIM = "rope.dimension_count"
K_ACT = "hidden_activation"

# names accepted for the FFN activation, as written by converters or given by the user
ACTIVATIONS = {"relu2": "relu2", "relu_squared": "relu2", "relu_sqr": "relu2", "relu^2": "relu2",
               "squared_relu": "relu2", "silu": "silu", "swish": "silu", "swiglu": "silu"}


def normalize_activation(name: str, source: str = "activation") -> str:
    key = str(name).strip().lower()
    if key not in ACTIVATIONS:
        raise ConfigError(f"{source} must be one of relu2, silu, got {name!r}")
    return ACTIVATIONS[key]


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a BitNet model, parsed from GGUF metadata."""

    arch: str                 # "bitnet-b1.58" | "bitnet-25" | "bitnet"
    name: str                 # general.name (or the file stem)
    n_vocab: int              # vocabulary size = rows of token_embd
    n_ctx: int                # trained context length
    n_embd: int               # hidden width D
    n_layer: int
    n_head: int               # query heads H
    n_head_kv: int            # key/value heads (H % KVH == 0; GQA group = H / KVH)
    head_dim: int             # D / H
    n_ff: int                 # FFN width F
    n_rot: int                # rotary dims per head (NEOX pairs i, i + head_dim/2)
    rope_base: float          # RoPE theta base
    rms_eps: float            # RMSNorm epsilon (all five norm kinds)
    ffn_act: str              # "relu2" (relu(gate)^2 * up) or "silu" (silu(gate) * up)
    tied_lm_head: bool        # True when output.weight is absent and token_embd is the lm_head

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_metadata(cls, md: dict, path, *, tied: bool, n_vocab_tensor: int,
                      ffn_act: str | None = None) -> "ModelConfig":
        """Parse and validate; ``ffn_act`` overrides the file's activation (user option)."""
        arch = md.get(KEY_ARCH)
        if arch not in SUPPORTED_ARCHS:
            raise ModelFormatError(path, f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")

        def req(suffix, typ=int):
            key = f"{arch}.{suffix}"
            if key not in md:
                raise ModelFormatError(path, f"missing metadata key '{key}'")
            try:
                val = typ(md[key])
            except (TypeError, ValueError):
                raise ModelFormatError(path, f"metadata key '{key}' has a bad value {md[key]!r}") from None
            if typ is int and val <= 0:
                raise ModelFormatError(path, f"metadata key '{key}' must be positive, got {val}")
            return val

        n_embd, n_head = req(K_EMBD), req(K_HEADS)
        n_head_kv = int(md.get(f"{arch}.{K_HEADS_KV}", n_head))
        if n_embd % n_head or n_head_kv <= 0 or n_head % n_head_kv:
            raise ModelFormatError(path, f"bad head layout: embedding {n_embd}, heads {n_head}, kv heads {n_head_kv}")
        head_dim = n_embd // n_head
        n_rot = int(md.get(f"{arch}.{K_ROPE_DIM}", head_dim))
        if n_rot > head_dim or n_rot % 2:
            raise ModelFormatError(path, f"rope.dimension_count {n_rot} must be even and <= head dim {head_dim}")
        if ffn_act is not None:
            act = normalize_activation(ffn_act, "ffn activation override")
        elif f"{arch}.{K_ACT}" in md:
            try:
                act = normalize_activation(md[f"{arch}.{K_ACT}"], f"metadata '{arch}.{K_ACT}'")
            except ConfigError as e:
                raise ModelFormatError(path, str(e)) from None
        else:
            # llama.cpp: bitnet-b1.58 / bitnet-25 use relu^2 (build_bitnet_158); arch "bitnet" uses SiLU
            act = "silu" if arch == "bitnet" else "relu2"
        n_vocab = int(md.get(f"{arch}.{K_VOCAB}", n_vocab_tensor))
        if n_vocab != n_vocab_tensor:
            raise ModelFormatError(path, f"{arch}.vocab_size = {n_vocab} but token_embd has {n_vocab_tensor} rows",
                                   tensor="token_embd.weight")
        return cls(arch=arch, name=str(md.get(KEY_NAME, "")), n_vocab=n_vocab,
                   n_ctx=int(md.get(f"{arch}.{K_CONTEXT}", 4096)), n_embd=n_embd, n_layer=req(K_LAYERS),
                   n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_ff=req(K_FF), n_rot=n_rot,
                   rope_base=float(md.get(f"{arch}.{K_ROPE_BASE}", 10000.0)), rms_eps=req(K_EPS, float),
                   ffn_act=act, tied_lm_head=tied)


KV_DTYPES = {"f32": np.float32, "f16": np.uint16}      # KV cache storage; "f16": IEEE float16 bits


LM_HEAD_DTYPES = ("f32", "bf16")
ARGMAX_HEADS = ("auto", "on", "off", "bf16", "int8")


def check_kv_dtype(kv_dtype) -> str:
    if kv_dtype not in KV_DTYPES:
        raise ConfigError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of the engine's preallocated state, and the engine-side choices of a job."""

    max_batch: int = 16
    """Sequences in flight together (KV slots): decoded together, one row each per step."""

    max_seq_len: int = 0
    """Longest sequence, prompt + generation (0: the model's context length)."""

    prefill_chunk: int = 128
    """Most rows (tokens) one step processes."""

    kv_cache_mb: float = 0.0
    """KV cache budget in MiB (0: max_batch full sequences, at most a quarter of the free memory)."""

    block_size: int = 16
    """Tokens per KV block (the unit of admission and of prefix sharing)."""

    threads: int = 0
    """Numba threads (0: all cores)."""

    kv_dtype: str = "f32"
    """KV cache storage: f32 = the BitNet spec's numerics; f16 = half the memory (llama.cpp's default)."""

    lm_head_dtype: str = "f32"
    """lm_head inputs: f32 = the spec's numerics (F16 table widened exactly); bf16 = table and rows rounded to
    bfloat16 with float32 sums: ~1.7x faster logits for many streams on CPUs with AVX512_BF16 (logits move by
    up to ~0.05)."""

    argmax_head: str = "auto"
    """Rows that want only their argmax (greedy sampling without penalties or logprobs, constrained or not) or
    their k largest logits (top-k sampling, k <= 256): "auto" computes the float32 logits of a cheaper screen's
    candidates for them alone, the same tokens bit for bit, on the SIMD kernel families (AVX2, AVX-512 VNNI) for
    lm_head tables of 16.8M entries or more: the int8 screen (exact integer dots with an int8 copy of the table,
    which replaces it in memory at half its size; 2B4T, 2 threads, avx512: 1.5-1.9x faster logits at 1-32
    streams); a job whose rows it cannot narrow (over 2048 candidates a row on average, judged over 32 rows or
    more) takes the float32 lm_head for the rest. "on" the int8 screen wherever the SIMD lm_head runs, always for
    greedy rows; "int8" the same; "bf16" the bf16 screen instead (bfloat16 logits, whose bound does not widen
    with outliers in the table's rows; +1 bfloat16 copy of the table); "off" never."""

    prefault_kv: bool = False
    """Write every page of the KV pool when the engine is built (see ``Engine``)."""

    prefix_cache: bool = True
    """Compute each shared prompt prefix once and reuse its KV blocks (the records do not change)."""

    def __post_init__(self):
        for name in ("max_batch", "prefill_chunk", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_seq_len", "kv_cache_mb", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_kv_dtype(self.kv_dtype)
        if self.lm_head_dtype not in LM_HEAD_DTYPES:
            raise ConfigError(f"lm_head_dtype must be one of {', '.join(LM_HEAD_DTYPES)}, got "
                              f"{self.lm_head_dtype!r}")
        if self.argmax_head not in ARGMAX_HEADS:
            raise ConfigError(f"argmax_head must be one of {', '.join(ARGMAX_HEADS)}, got {self.argmax_head!r}")
        if not isinstance(self.prefix_cache, bool):
            raise ConfigError(f"prefix_cache must be true or false, got {self.prefix_cache!r}")
