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
from .layout import padded_rows
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


def _norm_quantize(ws: Workspace, x: np.ndarray, norm_w: np.ndarray, eps: float, proj: Projection) -> np.ndarray:
    """int8(RMSNorm(x) * norm_w) at ``proj``'s padded input width: the norm and the per-token absmax quantization
    in one pass (the normed rows are never stored); returns the int8 rows, their scales and sums are in
    ``ws.xscale`` / ``ws.xsum``."""
    T = x.shape[0]
    kp = proj.packed.shape[1] * 4
    xq = ws.xq[:T * kp].reshape(T, kp)
    ternary.norm_quantize_rows(x, norm_w, eps, xq, ws.xscale, ws.xsum)
    return xq


def _norm_project(ws: Workspace, x: np.ndarray, norm_w: np.ndarray, eps: float, proj: Projection,
                  out: np.ndarray) -> None:
    """out = ternary(int8(RMSNorm(x) * norm_w)): ``_norm_quantize``, then the exact ternary matmul of the first
    out.shape[1] rows of ``proj`` (all of them, padding rows included, for a fused projection's one-row step)."""
    T = x.shape[0]
    xq = _norm_quantize(ws, x, norm_w, eps, proj)
    ternary.ternary_matmul(xq, ws.xscale[:T], ws.xsum[:T], proj.packed, proj.scale[:out.shape[1]], out)


def _norm_project_parts(ws: Workspace, x: np.ndarray, norm_w: np.ndarray, eps: float, proj: Projection,
                        flat: np.ndarray) -> list[np.ndarray]:
    """``_norm_project`` of a fused projection (q|k|v, gate|up) whose parts (``proj.starts`` / ``sizes``) are
    separate outputs, written into ``flat``; returns them as C-contiguous [T, size] arrays. One row: one matmul
    over all rows, the outputs are column ranges of its [1, N] result (contiguous, as it is one row). More rows:
    one quantization and a matmul per part, each into its own [T, size] block of ``flat``: column ranges of a
    [T, N] result would be strided views, on which the row kernels that follow vectorise badly or not at all
    (the gated activation and the ffn_sub_norm quantizer: 4x slower at 32 rows; RoPE ~15%)."""
    T = x.shape[0]
    if T == 1:
        out = flat[:proj.n_out].reshape(1, -1)
        _norm_project(ws, x, norm_w, eps, proj, out)
        return [out[:, lo:lo + n] for lo, n in zip(proj.starts, proj.sizes)]
    xq = _norm_quantize(ws, x, norm_w, eps, proj)
    outs = []
    for lo, n in zip(proj.starts, proj.sizes):
        out = flat[T * lo:T * (lo + n)].reshape(T, n)
        ternary.ternary_matmul(xq, ws.xscale[:T], ws.xsum[:T], proj.packed[lo:lo + padded_rows(n)],
                               proj.scale[lo:lo + n], out)
        outs.append(out)
    return outs


def forward(w: Weights, cfg: ModelConfig, ws: Workspace, kv: KVCache, rt: RopeTable,
            batch: StepBatch) -> np.ndarray:
    """Run one step; returns a view ``ws.logits[:R]`` (float32 [R, n_vocab]) for ``batch.logit_rows``."""
    T, R = batch.n_rows, batch.logit_rows.shape[0]
    if T == 0 or T > ws.max_rows or R > ws.max_logit_rows:
        raise ValueError(f"forward: {T} rows / {R} logit rows exceed the workspace ({ws.max_rows}, "
                         f"{ws.max_logit_rows})")
    H, KVH, hd = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    x, att, proj = ws.x[:T], ws.att[:T], ws.proj[:T]
    eps = cfg.rms_eps
    emb_k.embed(batch.tokens, w.tok_embd, w.tok_kind, x)
    for li, lw in enumerate(w.layers):
        kc, vc = kv.layer(li)
        q, k, v = _norm_project_parts(ws, x, lw.attn_norm, eps, lw.qkv, ws.qkv)
        q, k, v = q.reshape(T, H, hd), k.reshape(T, KVH, hd), v.reshape(T, KVH, hd)
        rope.rope_neox(q, batch.row_pos, rt.cos, rt.sin)
        rope.rope_neox(k, batch.row_pos, rt.cos, rt.sin)
        att_k.kv_write(k, v, kc, vc, kv.block_tables, batch.row_seq, batch.row_pos, ws.att_scratch)
        att_k.attention(q, kc, vc, kv.block_tables, batch.row_seq, batch.row_pos, att, ws.att_scratch)
        _norm_project(ws, att.reshape(T, cfg.q_dim), lw.attn_sub_norm, eps, lw.wo, proj)
        x += proj
        gate, up = _norm_project_parts(ws, x, lw.ffn_norm, eps, lw.gate_up, ws.gate_up)
        act_k.gated_activation(gate, up, _ACT[cfg.ffn_act], gate)        # in place: gate becomes the FFN rows
        _norm_project(ws, gate, lw.ffn_sub_norm, eps, lw.down, proj)
        x += proj
    xl = ws.xl[:R]
    np.take(x, batch.logit_rows, axis=0, out=xl)
    norms.rmsnorm(xl, w.output_norm, cfg.rms_eps, xl)
    xl32 = ws.xl32[:R]
    xl32[:] = xl
    out = ws.logits[:R]
    emb_k.lm_head(xl32, w.output, w.output_kind, ws.lm_scratch, out)
    return out
