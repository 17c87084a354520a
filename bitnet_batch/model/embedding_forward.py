"""Forward passes that end in the final normed hidden states (what embeddings pool), never in logits.

- ``embedding_hidden``: the qwen3 / gemma3 BitNet embedding models (``embedding_models`` has the layer equations).
  Each BitLinear is ``ternary.norm_quantize_rows`` (its input RMSNorm fused with the int8 quantizer) followed by
  ``ternary.ternary_matmul``; the q/k head norms are ``norms.rmsnorm`` over the [T * heads, head_dim] view; RoPE,
  the KV cache writes and the attention (``window_attention``: explicit scale, sliding windows) are the engine's
  kernels. A step's rows may belong to many sequences (``StepBatch``), as in the generative engine.
- ``bitnet_hidden``: the generative BitNet b1.58 models, through the same compiled layer as ``bitnet.forward``, then
  ``RMSNorm(x) * output_norm`` for the requested rows instead of the lm_head.

Activations are float64 between quantizers and the KV cache float32 (or float16 bits), as in the generative
engine: every row's result depends on that row's tokens and position only, so a text's hidden states are
bit-identical whatever else shares its steps and however its prompt is cut into steps.
"""
from __future__ import annotations

import numba
import numpy as np

from jit_kernels import activations as act_k
from jit_kernels import attention as att_k
from jit_kernels import embedding as emb_k
from jit_kernels import norms, rope, ternary
from jit_kernels.buffers import aligned_zeros
from jit_kernels.gelu import gelu_tanh_gated
from jit_kernels.attention import window_attention

from ..engine.kv_cache import KVCache
from .bitnet import StepBatch, hidden
from .embedding_models import EmbeddingModelConfig, EmbeddingWeights
from .layout import padded


class EmbeddingWorkspace:
    """Scratch of ``embedding_hidden`` for steps of up to ``max_rows`` rows and sequences up to ``max_seq_len``,
    allocated once (float64 activations, int8 quantizer output)."""

    def __init__(self, cfg: EmbeddingModelConfig, max_rows: int, max_seq_len: int):
        T, D, F = max_rows, cfg.n_embd, cfg.n_ff
        qd, kvd = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
        self.max_rows = T
        self.x = aligned_zeros((T, D), np.float64)          # residual stream
        self.h = aligned_zeros((T, D), np.float64)          # RMSNorm(x) * attn_norm / ffn_norm: input of 2-3 BitLinears
        self.xq = aligned_zeros(T * padded(max(D, F, qd)), np.int8)   # int8 activations, [T, Kp] views
        self.xscale = aligned_zeros(T, np.float32)
        self.xsum = aligned_zeros(T, np.int32)
        self.q = aligned_zeros((T, qd), np.float64)
        self.k = aligned_zeros((T, kvd), np.float64)
        self.v = aligned_zeros((T, kvd), np.float64)
        self.att = aligned_zeros((T, cfg.n_head, cfg.head_dim), np.float64)
        self.proj = aligned_zeros((T, D), np.float64)       # o / down projection output
        self.gate = aligned_zeros((T, F), np.float64)       # act(gate) * up replaces gate
        self.up = aligned_zeros((T, F), np.float64)
        self.out = aligned_zeros((T, D), np.float64)        # final normed rows
        self.att_scratch = att_k.attention_scratch(numba.config.NUMBA_NUM_THREADS, max_seq_len, cfg.head_dim,
                                                   cfg.n_head // cfg.n_head_kv)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))


def rope_table64(max_pos: int, n_rot: int, base: float):
    """cos, sin float64 [max_pos, n_rot // 2] (``rope.rope_table`` rounds them to float32: a 6e-8 relative error in q
    and k that moves ~1 in 10^6 int8 activations across a rounding step; at 200 tokens that already changed a
    Gemma3 test embedding by 4e-5 in cosine against the float64 reference)."""
    inv = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    ang = np.arange(max_pos, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang), np.sin(ang)


class RopeTables:
    """float64 cos / sin tables of the global layers and, when the model has sliding layers, of those (own base)."""

    def __init__(self, cfg: EmbeddingModelConfig, max_pos: int):
        self.cos, self.sin = rope_table64(max_pos, cfg.n_rot, cfg.rope_base)
        self.cos_swa, self.sin_swa = (rope_table64(max_pos, cfg.n_rot, cfg.rope_base_swa) if cfg.swa_layers
                                      else (self.cos, self.sin))

    def of_layer(self, cfg: EmbeddingModelConfig, layer: int):
        return (self.cos_swa, self.sin_swa) if cfg.is_sliding(layer) else (self.cos, self.sin)


def _bitlinear(x, w_in, proj, eps, ws: EmbeddingWorkspace, out):
    """out [T, n_out] = W(int8(RMSNorm(x) * w_in)): one BitLinear of the embedding models."""
    T = x.shape[0]
    kp = proj.packed.shape[1] * 4
    xq = ws.xq[:T * kp].reshape(T, kp)
    ternary.norm_quantize_rows(x, w_in, eps, xq, ws.xscale, ws.xsum)
    ternary.ternary_matmul(xq, ws.xscale, ws.xsum, proj.packed, proj.scale[:proj.sizes[0]], out)


def embedding_hidden(w: EmbeddingWeights, cfg: EmbeddingModelConfig, ws: EmbeddingWorkspace, kv: KVCache,
                     ropes: RopeTables, batch: StepBatch) -> np.ndarray:
    """Run one step of rows through the model; returns a view ``ws.out[:R]`` (float64 [R, D]) of the final normed
    hidden states of ``batch.logit_rows`` (in that order). K/V of every row are written to the cache."""
    T, R = batch.n_rows, batch.logit_rows.shape[0]
    if T == 0 or T > ws.max_rows or R > T:
        raise ValueError(f"embedding_hidden: {T} rows / {R} output rows for a workspace of {ws.max_rows}")
    eps = np.float32(cfg.rms_eps)
    H, KVH, hd = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    x, h, p = ws.x[:T], ws.h[:T], ws.proj[:T]
    q, k, v = ws.q[:T], ws.k[:T], ws.v[:T]
    att, gate, up = ws.att[:T], ws.gate[:T], ws.up[:T]
    emb_k.embed(batch.tokens, w.tok_embd, w.tok_kind, x)
    if cfg.embd_scale != 1.0:
        x *= cfg.embd_scale
    for li, lw in enumerate(w.layers):
        k_cache, v_cache = kv.layer(li)
        cos, sin = ropes.of_layer(cfg, li)
        norms.rmsnorm(x, lw.attn_norm, eps, h)
        _bitlinear(h, lw.norm_in["attn_q"], lw.q, eps, ws, q)
        _bitlinear(h, lw.norm_in["attn_k"], lw.k, eps, ws, k)
        _bitlinear(h, lw.norm_in["attn_v"], lw.v, eps, ws, v)
        qh, kh = q.reshape(T * H, hd), k.reshape(T * KVH, hd)
        norms.rmsnorm(qh, lw.q_norm, eps, qh)
        norms.rmsnorm(kh, lw.k_norm, eps, kh)
        q3, k3, v3 = q.reshape(T, H, hd), k.reshape(T, KVH, hd), v.reshape(T, KVH, hd)
        rope.rope_neox(q3, batch.row_pos, cos, sin)
        rope.rope_neox(k3, batch.row_pos, cos, sin)
        att_k.kv_write(k3, v3, k_cache, v_cache, kv.block_tables, batch.row_seq, batch.row_pos, ws.att_scratch)
        window = cfg.sliding_window if cfg.is_sliding(li) else 0
        window_attention(q3, k_cache, v_cache, kv.block_tables, batch.row_seq, batch.row_pos, window,
                         cfg.attn_scale, att, ws.att_scratch)
        _bitlinear(att.reshape(T, H * hd), lw.norm_in["attn_output"], lw.o, eps, ws, p)
        if lw.post_attn_norm is not None:
            norms.rmsnorm(p, lw.post_attn_norm, eps, p)
        x += p
        norms.rmsnorm(x, lw.ffn_norm, eps, h)
        _bitlinear(h, lw.norm_in["ffn_gate"], lw.gate, eps, ws, gate)
        _bitlinear(h, lw.norm_in["ffn_up"], lw.up, eps, ws, up)
        if cfg.ffn_act == "gelu_tanh":
            gelu_tanh_gated(gate, up, gate)
        else:
            act_k.gated_activation(gate, up, act_k.SILU, gate)
        _bitlinear(gate, lw.norm_in["ffn_down"], lw.down, eps, ws, p)
        if lw.post_ffw_norm is not None:
            norms.rmsnorm(p, lw.post_ffw_norm, eps, p)
        x += p
    out = ws.out[:R]
    np.take(x, batch.logit_rows, axis=0, out=out)
    norms.rmsnorm(out, w.output_norm, eps, out)
    return out



def bitnet_hidden(w, cfg, ws, kv: KVCache, rt, batch: StepBatch, out: np.ndarray) -> np.ndarray:
    """The generative BitNet b1.58 forward (``bitnet.hidden``: ``bitnet.forward``'s layers) up to
    ``RMSNorm(x) * output_norm`` of ``batch.logit_rows``, written into ``out`` (float64 [>= R, D]); returns
    ``out[:R]``. ``ws`` is an engine ``Workspace``, ``rt`` a ``bitnet.RopeTable``."""
    T, R = batch.n_rows, batch.logit_rows.shape[0]
    if T == 0 or T > ws.max_rows or R > T or out.shape[0] < R:
        raise ValueError(f"bitnet_hidden: {T} rows / {R} output rows for a workspace of {ws.max_rows}")
    return hidden(w, cfg, ws, kv, rt, batch, out)
