"""The BitNet b1.58 forward pass over one step of rows (tokens of any number of sequences).

Per layer (``/work/shared/spec/model_spec.md`` section 2)::

    h = RMSNorm(x) * attn_norm                    -> int8 per token -> q|k|v = ternary matmul (fused)
    q, k = RoPE_neox(q, k, pos)                   ; K/V stored in the paged cache
    a = softmax(q K^T / sqrt(hd) + causal) V      (GQA)
    x = x + W_o(int8(RMSNorm(a) * attn_sub_norm))
    h = RMSNorm(x) * ffn_norm                     -> int8 -> gate|up = ternary matmul (fused)
    x = x + W_down(int8(RMSNorm(act(gate) * up) * ffn_sub_norm))     act = relu^2 or silu
    logits = (RMSNorm(x) * output_norm) @ token_embd^T                (float, no activation quant)

Each RMSNorm that feeds a projection is fused with the int8 quantizer (``ternary.norm_quantize_rows``): the
normed rows h are never stored. ``forward`` returns logits only; it never samples. Prefill chunks and decode
steps are the same call.
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


def _norm_project(ws: Workspace, x: np.ndarray, norm_w: np.ndarray, eps: float, proj: Projection,
                  out: np.ndarray) -> None:
    """out = ternary(int8(RMSNorm(x) * norm_w)): the norm and the per-token absmax quantization in one pass
    (the normed rows are never stored), then the exact ternary matmul."""
    T = x.shape[0]
    kp = proj.packed.shape[1] * 4
    xq = ws.xq[:T * kp].reshape(T, kp)
    ternary.norm_quantize_rows(x, norm_w, eps, xq, ws.xscale, ws.xsum)
    ternary.ternary_matmul(xq, ws.xscale[:T], ws.xsum[:T], proj.packed, proj.scale, out)


def _norm_project_halves(ws: Workspace, x: np.ndarray, norm_w: np.ndarray, eps: float, proj: Projection,
                         out0: np.ndarray, out1: np.ndarray) -> None:
    """``_norm_project`` of a fused projection whose two halves of rows go to two outputs (gate, up): one
    quantization, a matmul per half, so each output is a contiguous array (a column half of one [T, 2F]
    output is a strided view, on which the row kernels that follow do not vectorise: 4x slower)."""
    T = x.shape[0]
    kp = proj.packed.shape[1] * 4
    half = proj.packed.shape[0] // 2
    xq = ws.xq[:T * kp].reshape(T, kp)
    ternary.norm_quantize_rows(x, norm_w, eps, xq, ws.xscale, ws.xsum)
    for rows, out in ((slice(0, half), out0), (slice(half, 2 * half), out1)):
        ternary.ternary_matmul(xq, ws.xscale[:T], ws.xsum[:T], proj.packed[rows], proj.scale[rows], out)


def forward(w: Weights, cfg: ModelConfig, ws: Workspace, kv: KVCache, rt: RopeTable,
            batch: StepBatch) -> np.ndarray:
    """Run one step; returns a view ``ws.logits[:R]`` (float32 [R, n_vocab]) for ``batch.logit_rows``."""
    T, R = batch.n_rows, batch.logit_rows.shape[0]
    if T == 0 or T > ws.max_rows or R > ws.max_logit_rows:
        raise ValueError(f"forward: {T} rows / {R} logit rows exceed the workspace ({ws.max_rows}, "
                         f"{ws.max_logit_rows})")
    H, KVH, hd = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    qd, kvd = cfg.q_dim, cfg.kv_dim
    x, qkv, att = ws.x[:T], ws.qkv[:T], ws.att[:T]
    proj, gate, up = ws.proj[:T], ws.gate[:T], ws.up[:T]
    ff = gate                      # the gated activation overwrites the gate rows in place
    eps = cfg.rms_eps
    emb_k.embed(batch.tokens, w.tok_embd, w.tok_kind, x)
    for li, lw in enumerate(w.layers):
        kc, vc = kv.layer(li)
        _norm_project(ws, x, lw.attn_norm, eps, lw.qkv, qkv)
        q = qkv[:, :qd].reshape(T, H, hd)
        k = qkv[:, qd:qd + kvd].reshape(T, KVH, hd)
        v = qkv[:, qd + kvd:].reshape(T, KVH, hd)
        rope.rope_neox(q, batch.row_pos, rt.cos, rt.sin)
        rope.rope_neox(k, batch.row_pos, rt.cos, rt.sin)
        att_k.kv_write(k, v, kc, vc, kv.block_tables, batch.row_seq, batch.row_pos, ws.att_scratch)
        att_k.attention(q, kc, vc, kv.block_tables, batch.row_seq, batch.row_pos, att, ws.att_scratch)
        _norm_project(ws, att.reshape(T, qd), lw.attn_sub_norm, eps, lw.wo, proj)
        x += proj
        _norm_project_halves(ws, x, lw.ffn_norm, eps, lw.gate_up, gate, up)
        act_k.gated_activation(gate, up, _ACT[cfg.ffn_act], ff)
        _norm_project(ws, ff, lw.ffn_sub_norm, eps, lw.down, proj)
        x += proj
    xl = ws.xl[:R]
    np.take(x, batch.logit_rows, axis=0, out=xl)
    norms.rmsnorm(xl, w.output_norm, cfg.rms_eps, xl)
    xl32 = ws.xl32[:R]
    xl32[:] = xl
    out = ws.logits[:R]
    emb_k.lm_head(xl32, w.output, w.output_kind, ws.lm_scratch, out)
    return out
