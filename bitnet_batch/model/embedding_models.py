"""Microsoft's 1-bit embedding models as bitnet.cpp's converter writes them: config and weights.

Two backbones, both decoder-only, with BitNet's "BitLinear" in place of every linear layer: an RMSNorm with its own
weight (the ``*_norm_in`` tensors), per-token int8 absmax activations and an absmean-ternarized weight
(``microsoft/BitNet`` ``docs/bitnet-embeddings-gguf-conversion.md`` section 1 and 4,
``utils/convert-bitnet-embedding-to-gguf.py``):

- **qwen3** (BitNet-embedding-0.6B: 28 layers, hidden 1024, 16/8 heads of 128, FFN 3072, vocab 151936)::

      h = RMSNorm(x) * attn_norm
      q = W_q(int8(RMSNorm(h) * attn_q_norm_in))     (k, v alike, each with its own norm_in)
      q = RMSNorm_head(q) * attn_q_norm ; k alike     (per head of head_dim, before RoPE)
      q, k = RoPE_neox(q, k, theta = rope.freq_base)
      a = softmax(q k^T / sqrt(head_dim) + causal) v
      x = x + W_o(int8(RMSNorm(a) * attn_output_norm_in))
      h = RMSNorm(x) * ffn_norm
      x = x + W_down(int8(RMSNorm(silu(W_gate(int8(RMSNorm(h) * g_in))) * W_up(int8(RMSNorm(h) * u_in)))
                          * ffn_down_norm_in))
      out = RMSNorm(x) * output_norm          (the hidden states that are pooled; there is no lm_head)

- **gemma3** (BitNet-embedding-270M: 18 layers, hidden 640, 4/1 heads of 256, FFN 2048, vocab 262144): the same
  with x0 = embedding * sqrt(n_embd), GELU (tanh form) instead of SiLU, RMSNorm(attention out) *
  post_attention_norm before the residual add and RMSNorm(FFN out) * post_ffw_norm likewise, attention scale
  ``query_pre_attn_scalar ** -0.5`` and, where the file sets a sliding window, sliding-window layers with their own
  RoPE base.

Where the sources leave a choice open, and what we chose (``docs/embeddings.md`` has the reasoning):

- head_dim comes from ``{arch}.attention.key_length`` (``value_length`` must agree): it is not n_embd / n_head in
  either model (the converter writes both keys for that reason).
- Gemma3's own norms (attn_norm, post_attention_norm, ffn_norm, post_ffw_norm, attn_q_norm, attn_k_norm,
  output_norm) are Gemma RMSNorms, ``x * (1 + w)`` (transformers ``Gemma3RMSNorm``); bitnet.cpp's converter
  copies ``w`` unchanged (mainline llama.cpp's adds 1 at conversion), so we add 1 (in float32, as transformers
  does) at load. The BitLinear input norms (``*_norm_in``) are plain RMSNorms ``x * w`` in both backbones (the
  BitLinear layer is the same module whatever the backbone).
- The attention pattern: ``{arch}.attention.sliding_window`` (W > 0: a sliding layer at position p attends to
  positions p - W + 1 .. p, as transformers' ``sliding_window_overlay``), ``{arch}.attention.sliding_window_pattern``
  (an array of bools, true = sliding, or n: layer i slides unless i % n == n - 1; default 6) and
  ``{arch}.rope.freq_base_swa`` (default 10000) as mainline llama.cpp reads them. bitnet.cpp's converter writes
  none of these, so its files run with full attention in every layer.
- ``{arch}.attention.query_pre_attn_scalar`` (gemma3; the BitNet docs name it, the converter does not write it)
  sets the attention scale; default head_dim.
- F16 / F32 projection weights are BitNet master weights and are ternarized with the absmean rule at load, as for
  the generative models (bitnet.cpp would multiply them unquantized).
- Every layer must have all seven ``*_norm_in`` tensors: without them the file is a full-precision model (the
  converter's "F16 baseline" of the teacher), which a ternary engine cannot run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import KEY_ARCH, KEY_NAME, ModelConfig
from ..errors import ModelFormatError
from .gguf import GGUFFile
from .weights import GGUFSource, Projection

EMBEDDING_ARCHS = ("qwen3", "gemma3")

# GGUF keys (suffixes after "{arch}."), llama.cpp names
K_KEY_LENGTH = "attention.key_length"
K_VALUE_LENGTH = "attention.value_length"
K_POOLING = "pooling_type"
K_SLIDING_WINDOW = "attention.sliding_window"
K_SLIDING_PATTERN = "attention.sliding_window_pattern"
K_ROPE_BASE_SWA = "rope.freq_base_swa"
K_QUERY_PRE_ATTN_SCALAR = "attention.query_pre_attn_scalar"

#: llama.cpp ``enum llama_pooling_type`` values of ``{arch}.pooling_type`` -> our names.
POOLING_TYPES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
DEFAULT_SWA_PATTERN = 6                 # transformers Gemma3TextConfig / llama.cpp gemma3 default
DEFAULT_ROPE_BASE_SWA = 10000.0         # transformers rope_local_base_freq default
FFN_ACT = {"qwen3": "silu", "gemma3": "gelu_tanh"}

# the seven BitLinear input norms of a layer: tensor suffix -> the projection it feeds
NORM_IN = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class EmbeddingModelConfig(ModelConfig):
    """``ModelConfig`` of an embedding model, plus what the generative BitNet layout does not have.
    ``head_dim`` is the attention head width from ``key_length`` (not n_embd / n_head); ``tied_lm_head`` is
    meaningless here (no lm_head) and set True."""

    embd_scale: float = 1.0             # x0 = embedding * embd_scale (gemma3: float32(sqrt(n_embd)))
    attn_scale: float = 0.0             # scores = q . k * attn_scale
    sliding_window: int = 0             # W of the sliding layers; 0: no sliding layers
    swa_layers: tuple = ()              # per layer: True = sliding window (empty: none)
    rope_base_swa: float = 0.0          # RoPE base of the sliding layers
    gemma_norms: bool = False           # the backbone's own norms are x * (1 + w) (weights shifted at load)
    post_norms: bool = False            # post_attention_norm / post_ffw_norm (gemma3)
    pooling: str = "last"               # default pooling from {arch}.pooling_type ("mean", "last", "cls")
    embedding_only: bool = True         # no lm_head: Model.logits refuses it

    def is_sliding(self, layer: int) -> bool:
        return bool(self.swa_layers) and bool(self.swa_layers[layer])

    @classmethod
    def from_metadata(cls, md: dict, path, *, tied: bool = True, n_vocab_tensor: int,
                      ffn_act: str | None = None) -> "EmbeddingModelConfig":
        """Parse and validate the GGUF keys of a qwen3 / gemma3 embedding model (errors name the key)."""
        arch = md.get(KEY_ARCH)
        if arch not in EMBEDDING_ARCHS:
            raise ModelFormatError(path, f"not an embedding architecture: {arch!r} (supported: "
                                   f"{', '.join(EMBEDDING_ARCHS)})")
        get = _Keys(md, arch, path)
        n_embd, n_head, n_layer = get.int("embedding_length"), get.int("attention.head_count"), get.int("block_count")
        n_head_kv = get.int("attention.head_count_kv", n_head)
        if n_head % n_head_kv:
            raise ModelFormatError(path, f"{n_head} query heads are not a multiple of {n_head_kv} KV heads")
        head_dim = get.int(K_KEY_LENGTH, n_embd // n_head)
        if get.int(K_VALUE_LENGTH, head_dim) != head_dim:
            raise ModelFormatError(path, f"'{arch}.{K_VALUE_LENGTH}' = {md.get(f'{arch}.{K_VALUE_LENGTH}')} differs "
                                   f"from '{arch}.{K_KEY_LENGTH}' = {head_dim}; unequal K/V head widths are not "
                                   "supported")
        n_rot = get.int("rope.dimension_count", head_dim)
        if n_rot > head_dim or n_rot % 2:
            raise ModelFormatError(path, f"'{arch}.rope.dimension_count' = {n_rot} must be even and <= head_dim "
                                   f"{head_dim}")
        n_vocab = get.int("vocab_size", n_vocab_tensor)
        if n_vocab != n_vocab_tensor:
            raise ModelFormatError(path, f"{arch}.vocab_size = {n_vocab} but token_embd has {n_vocab_tensor} rows",
                                   tensor="token_embd.weight")
        pooling_id = get.int(K_POOLING, 3, positive=False)
        pooling = POOLING_TYPES.get(pooling_id)
        if pooling not in ("mean", "last", "cls"):
            raise ModelFormatError(path, f"'{arch}.{K_POOLING}' = {pooling_id} ({pooling or 'unknown'}) is not "
                                   "supported (1 mean, 2 cls, 3 last)")
        gemma = arch == "gemma3"
        window = get.int(K_SLIDING_WINDOW, 0, positive=False) if gemma else 0
        swa = _swa_layers(md, arch, path, n_layer) if window > 0 else ()
        scalar = get.float(K_QUERY_PRE_ATTN_SCALAR, float(head_dim)) if gemma else float(head_dim)
        if not scalar > 0:
            raise ModelFormatError(path, f"'{arch}.{K_QUERY_PRE_ATTN_SCALAR}' must be positive, got {scalar}")
        return cls(arch=arch, name=str(md.get(KEY_NAME, "")), n_vocab=n_vocab,
                   n_ctx=get.int("context_length", 32768), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                   n_head_kv=n_head_kv, head_dim=head_dim, n_ff=get.int("feed_forward_length"), n_rot=n_rot,
                   rope_base=get.float("rope.freq_base", 10000.0 if gemma else 1000000.0),
                   rms_eps=get.float("attention.layer_norm_rms_epsilon", 1e-6), ffn_act=FFN_ACT[arch],
                   tied_lm_head=True,
                   embd_scale=float(np.float32(math.sqrt(n_embd))) if gemma else 1.0,
                   attn_scale=float(scalar ** -0.5), sliding_window=window, swa_layers=swa,
                   rope_base_swa=get.float(K_ROPE_BASE_SWA, DEFAULT_ROPE_BASE_SWA) if swa else 0.0,
                   gemma_norms=gemma, post_norms=gemma, pooling=pooling)


class _Keys:
    """Typed reads of ``{arch}.*`` metadata keys; errors name the key and the file."""

    def __init__(self, md, arch, path):
        self.md, self.arch, self.path = md, arch, path

    def _raw(self, suffix, default):
        key = f"{self.arch}.{suffix}"
        if key not in self.md:
            if default is None:
                raise ModelFormatError(self.path, f"missing metadata key '{key}'")
            return key, default
        return key, self.md[key]

    def int(self, suffix, default=None, *, positive=True) -> int:
        key, v = self._raw(suffix, default)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (positive and v <= 0) or v < 0:
            raise ModelFormatError(self.path, f"metadata key '{key}' must be a {'positive ' if positive else ''}"
                                   f"integer, got {v!r}")
        return int(v)

    def float(self, suffix, default=None) -> float:
        key, v = self._raw(suffix, default)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ModelFormatError(self.path, f"metadata key '{key}' must be a number, got {v!r}")
        return float(v)


def _swa_layers(md, arch, path, n_layer) -> tuple:
    """Which layers slide: ``sliding_window_pattern`` as llama.cpp reads it (array of bools, or a period n)."""
    key = f"{arch}.{K_SLIDING_PATTERN}"
    pat = md.get(key, DEFAULT_SWA_PATTERN)
    if isinstance(pat, (list, np.ndarray)):
        arr = np.asarray(pat)
        if arr.shape != (n_layer,) or arr.dtype.kind not in "biu":
            raise ModelFormatError(path, f"metadata key '{key}' must hold {n_layer} booleans, got {arr.shape} "
                                   f"{arr.dtype}")
        return tuple(bool(b) for b in arr)
    if isinstance(pat, bool) or not isinstance(pat, (int, np.integer)) or pat < 0:
        raise ModelFormatError(path, f"metadata key '{key}' must be a layer period or an array of booleans, "
                               f"got {pat!r}")
    n = int(pat)
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layer))


# ---- weights ---------------------------------------------------------------------------------------------

@dataclass
class EmbeddingLayerWeights:
    """One layer. Projections are single-part ``Projection``s (each has its own input norm, so nothing is fused);
    every norm is float32 and already in multiply form (Gemma's 1 + w applied)."""
    attn_norm: np.ndarray       # [D]
    q: Projection               # [H * hd] x D
    k: Projection               # [KVH * hd] x D
    v: Projection               # [KVH * hd] x D
    o: Projection               # D x [H * hd]
    gate: Projection            # F x D
    up: Projection              # F x D
    down: Projection            # D x F
    norm_in: dict               # projection name (NORM_IN) -> float32 [its input width]
    q_norm: np.ndarray          # [hd] per-head norm of q
    k_norm: np.ndarray          # [hd]
    ffn_norm: np.ndarray        # [D]
    post_attn_norm: np.ndarray | None   # [D] (gemma3)
    post_ffw_norm: np.ndarray | None    # [D] (gemma3)

    @property
    def projections(self) -> tuple:
        return self.q, self.k, self.v, self.o, self.gate, self.up, self.down


@dataclass
class EmbeddingWeights:
    tok_embd: np.ndarray        # [V, D] uint16 (F16/BF16 bits) or float32, memory-mapped
    tok_kind: int               # jit_kernels.embedding.F16 / BF16 / F32
    output_norm: np.ndarray     # float32 [D]
    layers: list

    @property
    def nbytes_ternary(self) -> int:
        return sum(p.nbytes for lw in self.layers for p in lw.projections)


def _shifted(w: np.ndarray, gemma: bool) -> np.ndarray:
    """A backbone norm weight in multiply form: Gemma's ``1 + w`` in float32 (as transformers computes it)."""
    return (np.float32(1.0) + w).astype(np.float32) if gemma else w


def load_embedding_weights(gf: GGUFFile, cfg: EmbeddingModelConfig) -> EmbeddingWeights:
    """The model's tensors in kernel layout. Missing, misshapen or unsupported tensors raise ModelFormatError naming
    file and tensor."""
    src = GGUFSource(gf)
    d, f, hd = cfg.n_embd, cfg.n_ff, cfg.head_dim
    qd, kvd = cfg.n_head * hd, cfg.n_head_kv * hd
    tok, kind = src.matrix("token_embd.weight", cfg.n_vocab, d)
    g = cfg.gemma_norms
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        missing = [f"{p}{n}_norm_in.weight" for n in NORM_IN if f"{p}{n}_norm_in.weight" not in gf.tensors]
        if missing:
            raise ModelFormatError(gf.path, "missing BitLinear input norm: not a BitNet embedding model (a "
                                   f"full-precision {cfg.arch} GGUF?); bitnet-batch runs ternary models only",
                                   tensor=missing[0])
        widths = {"attn_q": d, "attn_k": d, "attn_v": d, "attn_output": qd, "ffn_gate": d, "ffn_up": d,
                  "ffn_down": f}
        proj = lambda name, n_out, n_in: src.fused([(p + name + ".weight", n_out)], n_in)  # noqa: E731
        layers.append(EmbeddingLayerWeights(
            attn_norm=_shifted(src.vector(p + "attn_norm.weight", d), g),
            q=proj("attn_q", qd, d), k=proj("attn_k", kvd, d), v=proj("attn_v", kvd, d),
            o=proj("attn_output", d, qd),
            gate=proj("ffn_gate", f, d), up=proj("ffn_up", f, d), down=proj("ffn_down", d, f),
            norm_in={n: src.vector(f"{p}{n}_norm_in.weight", w) for n, w in widths.items()},
            q_norm=_shifted(src.vector(p + "attn_q_norm.weight", hd), g),
            k_norm=_shifted(src.vector(p + "attn_k_norm.weight", hd), g),
            ffn_norm=_shifted(src.vector(p + "ffn_norm.weight", d), g),
            post_attn_norm=_shifted(src.vector(p + "post_attention_norm.weight", d), g) if cfg.post_norms else None,
            post_ffw_norm=_shifted(src.vector(p + "post_ffw_norm.weight", d), g) if cfg.post_norms else None,
        ))
    return EmbeddingWeights(tok_embd=tok, tok_kind=kind,
                            output_norm=_shifted(src.vector("output_norm.weight", d), g), layers=layers)


def is_embedding_arch(md: dict) -> bool:
    return md.get(KEY_ARCH) in EMBEDDING_ARCHS

