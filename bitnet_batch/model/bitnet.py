"""The BitNet b1.58 forward pass over one step of rows (tokens of any number of sequences).

Per layer (``/work/shared/spec/model_spec.md`` section 2)::

    h = RMSNorm(x) * attn_norm                    -> int8 per token -> q|k|v = ternary matmul (fused)
    q, k = RoPE_neox(q, k, pos)                   ; K/V stored in the paged cache
    a = softmax(q K^T / sqrt(hd) + causal) V      (GQA)
    x = x + W_o(int8(RMSNorm(a) * attn_sub_norm))
    h = RMSNorm(x) * ffn_norm                     -> int8 -> gate|up = ternary matmul (fused)
    x = x + W_down(int8(RMSNorm(act(gate) * up) * ffn_sub_norm))     act = relu^2 or silu
    logits = (RMSNorm(x) * output_norm) @ token_embd^T                (float, no activation quant)

``forward`` returns logits only; it never samples. Prefill chunks and decode steps are the same call.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jit_kernels import activations as act_k
from jit_kernels import attention as att_k
from jit_kernels import embedding as emb_k
from jit_kernels import norms, rope, ternary

from ..config import ModelConfig
from ..engine.kv_cache import KVCache
from ..engine.workspace import Workspace
from .weights import Projection, Weights

_ACT = {"relu2": act_k.RELU2, "silu": act_k.SILU}


@dataclass
class StepBatch:
    """The rows of one forward step."""
    tokens: np.ndarray       # int32 [T] token ids
    row_seq: np.ndarray      # int32 [T] KV slot (sequence) of each row
    row_pos: np.ndarray      # int32 [T] position of each row in its sequence
    logit_rows: np.ndarray   # int32 [R] rows whose logits are wanted, in output order

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])


class RopeTable:
    def __init__(self, cfg: ModelConfig, max_pos: int):
        self.cos, self.sin = rope.rope_table(max_pos, cfg.n_rot, cfg.rope_base)


def _project(ws: Workspace, x: np.ndarray, proj: Projection, out: np.ndarray) -> None:
    """out = ternary(int8(x)): per-token absmax quantization then the exact ternary matmul."""
    T = x.shape[0]
    kp = proj.packed.shape[1] * 4
    xq = ws.xq[:T * kp].reshape(T, kp)
    ternary.quantize_rows(x, xq, ws.xscale, ws.xsum)
    ternary.ternary_matmul(xq, ws.xscale[:T], ws.xsum[:T], proj.packed, proj.scale, out)


def forward(w: Weights, cfg: ModelConfig, ws: Workspace, kv: KVCache, rt: RopeTable,
            batch: StepBatch) -> np.ndarray:
    """Run one step; returns a view ``ws.logits[:R]`` (float32 [R, n_vocab]) for ``batch.logit_rows``."""
    T, R = batch.n_rows, batch.logit_rows.shape[0]
    if T == 0 or T > ws.max_rows or R > ws.max_logit_rows:
        raise ValueError(f"forward: {T} rows / {R} logit rows exceed the workspace ({ws.max_rows}, "
                         f"{ws.max_logit_rows})")
    D, F, H, KVH, hd = cfg.n_embd, cfg.n_ff, cfg.n_head, cfg.n_head_kv, cfg.head_dim
    qd, kvd = cfg.q_dim, cfg.kv_dim
    x, h, qkv, att = ws.x[:T], ws.h[:T], ws.qkv[:T], ws.att[:T]
    proj, gu = ws.proj[:T], ws.gu[:T]
    ff = gu[:, :F]                 # the gated activation overwrites the gate half in place
    emb_k.embed(batch.tokens, w.tok_embd, w.tok_kind, x)
    for li, lw in enumerate(w.layers):
        kc, vc = kv.layer(li)
        hd_in = h[:, :D]
        norms.rmsnorm(x, lw.attn_norm, cfg.rms_eps, hd_in)
        _project(ws, hd_in, lw.qkv, qkv)
        q = qkv[:, :qd].reshape(T, H, hd)
        k = qkv[:, qd:qd + kvd].reshape(T, KVH, hd)
        v = qkv[:, qd + kvd:].reshape(T, KVH, hd)
        rope.rope_neox(q, batch.row_pos, rt.cos, rt.sin)
        rope.rope_neox(k, batch.row_pos, rt.cos, rt.sin)
        att_k.kv_write(k, v, kc, vc, kv.block_tables, batch.row_seq, batch.row_pos)
        att_k.attention(q, kc, vc, kv.block_tables, batch.row_seq, batch.row_pos, att, ws.att_scratch)
        a = h[:, :qd]
        norms.rmsnorm(att.reshape(T, qd), lw.attn_sub_norm, cfg.rms_eps, a)
        _project(ws, a, lw.wo, proj)
        x += proj
        norms.rmsnorm(x, lw.ffn_norm, cfg.rms_eps, hd_in)
        _project(ws, hd_in, lw.gate_up, gu)
        act_k.gated_activation(gu[:, :F], gu[:, F:], _ACT[cfg.ffn_act], ff)
        norms.rmsnorm(ff, lw.ffn_sub_norm, cfg.rms_eps, ff)
        _project(ws, ff, lw.down, proj)
        x += proj
    xl = ws.xl[:R]
    np.take(x, batch.logit_rows, axis=0, out=xl)
    norms.rmsnorm(xl, w.output_norm, cfg.rms_eps, xl)
    xl32 = ws.xl32[:R]
    xl32[:] = xl
    out = ws.logits[:R]
    emb_k.lm_head(xl32, w.output, w.output_kind, ws.lm_scratch, out)
    return out
