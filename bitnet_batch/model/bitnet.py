"""The BitNet b1.58 forward pass over one step of rows (tokens of any number of sequences).

Per layer (``docs/model.md`` section 2)::

    h = RMSNorm(x) * attn_norm                    -> int8 per token -> q|k|v = ternary matmul (fused)
    q, k = RoPE_neox(q, k, pos)                   ; K/V stored in the paged cache
    a = softmax(q K^T / sqrt(hd) + causal) V      (GQA)
    x = x + W_o(int8(RMSNorm(a) * attn_sub_norm))
    h = RMSNorm(x) * ffn_norm                     -> int8 -> gate|up = ternary matmul (fused)
    x = x + W_down(int8(RMSNorm(act(gate) * up) * ffn_sub_norm))     act = relu^2 or silu
    logits = (RMSNorm(x) * output_norm) @ token_embd^T                (float, no activation quant)

Each RMSNorm that feeds a projection is fused with the int8 quantizer (``ternary.norm_quantize_rows``): the
normed rows h are never stored. Each layer is one compiled call (``jit_kernels.layer.bitnet_layer``: the kernel
sequence without a Python round trip per kernel, bit for bit what the kernel wrappers give one by one; its
arguments are checked once per workspace). ``forward`` returns logits only; it never samples. Prefill chunks and
decode steps are the same call.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from jit_kernels import activations as act_k
from jit_kernels import embedding as emb_k
from jit_kernels import layer as layer_k
from jit_kernels import lm_head_bf16
from jit_kernels import norms, rope
from jit_kernels._config import serial_max
from jit_kernels._cpu import KERNEL, kernel_id

from ..config import ModelConfig
from ..engine.kv_cache import KVCache
from ..engine.workspace import Workspace
from .weights import Weights

_ACT = {"relu2": act_k.RELU2, "silu": act_k.SILU}
_CHECKED = weakref.WeakKeyDictionary()     # workspace -> (weights, KV cache, RoPE table) ids it was checked with


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


def _check_layers(w: Weights, ws: Workspace, kv: KVCache, rt: RopeTable) -> None:
    """What the compiled layer takes for granted, checked once per (workspace, weights, cache, RoPE table)."""
    key = (id(w), id(kv), id(rt))
    if _CHECKED.get(ws) == key:
        return
    for li, lw in enumerate(w.layers):
        try:
            layer_k.check_layer(ws.max_rows, ws.x, ws.xq, ws.xscale, ws.xsum, ws.qkv, ws.att, ws.proj, ws.gate_up,
                                ws.att_scratch, *lw.kernel_args, *kv.layer(li), kv.block_tables, rt.cos, rt.sin)
        except ValueError as e:
            raise ValueError(f"layer {li}: {e}") from None
    _CHECKED[ws] = key


def forward(w: Weights, cfg: ModelConfig, ws: Workspace, kv: KVCache, rt: RopeTable,
            batch: StepBatch, lm_bf16: np.ndarray | None = None, argmax_head=None, n_argmax: int = 0,
            argmax_masks=None, argmax_ks=None) -> np.ndarray:
    """Run one step; returns a view ``ws.logits[:R]`` (float32 [R, n_vocab]) for ``batch.logit_rows``.
    ``lm_bf16``: the model's bfloat16 lm_head table (``Model.bf16_lm_head``; the workspace then has the bf16
    buffers) for the opt-in bf16 lm_head, else the spec's float32 one. ``argmax_head`` (an ``ArgmaxHead``): the
    last ``n_argmax`` logit rows want only their argmax, and get the float32 logits of its candidates alone
    (-inf elsewhere); ``argmax_masks``: for each of them None or the bitmask of the tokens it may take;
    ``argmax_ks``: for each of them 1, or k for a row whose k largest logits are wanted (top-k sampling)."""
    T, R = batch.n_rows, batch.logit_rows.shape[0]
    if T == 0 or T > ws.max_rows or R > ws.max_logit_rows or not 0 <= n_argmax <= R:
        raise ValueError(f"forward: {T} rows / {R} logit rows ({n_argmax} argmax rows) exceed the workspace "
                         f"({ws.max_rows}, {ws.max_logit_rows})")
    xl = hidden(w, cfg, ws, kv, rt, batch, ws.xl)
    xl32 = ws.xl32[:R]
    xl32[:] = xl
    out = ws.logits[:R]
    if lm_bf16 is None:
        E = R - n_argmax if argmax_head is not None else R
        if E:
            emb_k.lm_head(xl32[:E], w.output, w.output_kind, ws.lm_scratch, out[:E])
        if E < R:
            argmax_head(xl32[E:], out[E:], argmax_masks, argmax_ks)
    else:
        xb, xr = ws.xb[:R], ws.xr[:R]
        lm_head_bf16.round_rows(xl32, xb, xr)
        lm_head_bf16.lm_head_bf16(xb, xr, lm_bf16, ws.bf16_scratch, out)
    return out


def hidden(w: Weights, cfg: ModelConfig, ws: Workspace, kv: KVCache, rt: RopeTable, batch: StepBatch,
           out: np.ndarray) -> np.ndarray:
    """The layers of one step (the same compiled call per layer), then ``RMSNorm(x) * output_norm`` of
    ``batch.logit_rows`` written into ``out`` (float64 [>= R, D]); returns ``out[:R]``. The caller checks the row
    counts against the workspace."""
    T, R = batch.n_rows, batch.logit_rows.shape[0]
    _check_layers(w, ws, kv, rt)
    layer_k.check_rows(T, batch.row_seq, batch.row_pos, kv.block_tables, kv.block_size, rt.cos, ws.att_scratch,
                       cfg.n_head // cfg.n_head_kv, cfg.head_dim)
    x = ws.x[:T]
    emb_k.embed(batch.tokens, w.tok_embd, w.tok_kind, x)
    step = (np.float32(cfg.rms_eps), _ACT[cfg.ffn_act], serial_max(), kernel_id(KERNEL))
    for li, lw in enumerate(w.layers):
        layer_k.bitnet_layer(x, ws.xq, ws.xscale, ws.xsum, ws.qkv, ws.att, ws.proj, ws.gate_up, ws.att_scratch,
                             *lw.kernel_args, *kv.layer(li), kv.block_tables, batch.row_seq, batch.row_pos, rt.cos,
                             rt.sin, *step)
    rows = out[:R]
    np.take(x, batch.logit_rows, axis=0, out=rows)
    norms.rmsnorm(rows, w.output_norm, cfg.rms_eps, rows)
    return rows
