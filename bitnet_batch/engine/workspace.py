"""Scratch buffers of the forward pass, allocated once for (model, max rows per step, max logit rows).

Kernels write into views ``buf[:T]`` of these; nothing is allocated per step. Activations are float64:
they are a few rows wide (cheap next to the weights), and computing norms, projections' outputs, RoPE,
attention and the FFN gate in float64 leaves the float32 rounding at the int8 quantizer's input as the
only rounding, as in the float64 reference. That keeps per-token int8 rounding flips (which cascade) rare.
The KV cache stays float32 (memory) and the lm_head runs on float32 rows. Every buffer starts a cache line
(``jit_kernels.buffers``: the AVX2 kernels' 32-byte operands never straddle two).
"""
from __future__ import annotations

import numba
import numpy as np

from jit_kernels.attention import attention_scratch
from jit_kernels.buffers import aligned_zeros
from jit_kernels import lm_head_bf16 as lm_head_bf16_k
from jit_kernels.embedding import lm_head_scratch

from ..config import ModelConfig
from ..model.layout import padded, part_starts


class Workspace:
    def __init__(self, cfg: ModelConfig, max_rows: int, max_logit_rows: int, max_seq_len: int, *,
                 lm_head_bf16: bool = False):
        T, D, F = max_rows, cfg.n_embd, cfg.n_ff
        qkv = part_starts((cfg.q_dim, cfg.kv_dim, cfg.kv_dim))[1]       # the fused projections' rows, parts
        gate_up = part_starts((F, F))[1]                                 # starting row pairs (Projection)
        self.max_rows = T
        self.max_logit_rows = max_logit_rows
        self.x = aligned_zeros((T, D), np.float64)  # residual stream
        # int8 activations, flat: each projection views it as a contiguous [T, Kp] (a row stride wider than Kp
        # made the ternary matmul ~30% slower at K = 2560)
        self.xq = aligned_zeros(T * padded(max(D, F, cfg.q_dim)), np.int8)
        self.xscale = aligned_zeros(T, np.float32)  # per-token activation scale s_t
        self.xsum = aligned_zeros(T, np.int32)  # per-token sum of int8 activations
        # fused projections' outputs, flat: [T, q|k|v] for one row, else one C-contiguous [T, width] array per
        # part (see ``jit_kernels.layer._project_parts``)
        self.qkv = aligned_zeros(T * qkv, np.float64)
        self.att = aligned_zeros((T, cfg.n_head, cfg.head_dim), np.float64)  # attention output per head
        self.proj = aligned_zeros((T, D), np.float64)  # o_proj / down_proj output
        self.gate_up = aligned_zeros(T * gate_up, np.float64)  # the same for gate|up; act(gate) * up replaces gate
        self.xl = aligned_zeros((max_logit_rows, D), np.float64)  # final-normed rows that need logits
        self.xl32 = aligned_zeros((max_logit_rows, D), np.float32)  # the same rounded for the lm_head
        self.logits = aligned_zeros((max_logit_rows, cfg.n_vocab), np.float32)
        self.att_scratch = attention_scratch(numba.config.NUMBA_NUM_THREADS, max_seq_len, cfg.head_dim,
                                             cfg.n_head // cfg.n_head_kv)
        self.lm_scratch = lm_head_scratch(numba.config.NUMBA_NUM_THREADS, D)
        if lm_head_bf16:            # the logit rows rounded to bfloat16: bits for the tiles, values for plain loops
            Dp = lm_head_bf16_k.padded_dim(D)
            self.xb = aligned_zeros((max_logit_rows, Dp), np.uint16)
            self.xr = aligned_zeros((max_logit_rows, Dp), np.float32)
            self.bf16_scratch = lm_head_bf16_k.scratch(numba.config.NUMBA_NUM_THREADS, D)
        for a in vars(self).values():     # fault the pages in now, not in the first full step (see Engine)
            if isinstance(a, np.ndarray):
                a.fill(0)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))
