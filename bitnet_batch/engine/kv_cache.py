"""The paged KV cache: the only owner of the K/V arrays and of the block tables.

Memory is a pool of fixed-size blocks shared by all sequences; a sequence holds a list of blocks
(its row of ``block_tables``), grown as it advances and returned to the pool when it is freed. The pool
is sized once (from a token budget) so admission control can be exact: a request is admitted only when
the blocks it will need are available.

    k, v          float32 or uint16 [n_layer, n_blocks, n_kv_heads, block_size, head_dim]
    block_tables  int32   [max_seqs, max_blocks_per_seq]   (-1 = unassigned)

``dtype`` "f32" (default) keeps K/V in float32, the BitNet spec's numerics; "f16" keeps IEEE float16 bits in
uint16 (half the memory; what llama.cpp and bitnet.cpp use by default; rounding rules in
``jit_kernels.attention``).
"""
from __future__ import annotations

import numpy as np

from jit_kernels.buffers import aligned_zeros

from ..errors import ConfigError, ContextOverflowError

KV_DTYPES = {"f32": np.float32, "f16": np.uint16}      # "f16": float16 bits


def check_kv_dtype(kv_dtype) -> str:
    if kv_dtype not in KV_DTYPES:
        raise ConfigError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype


def kv_bytes_per_token(n_layer: int, kv_dim: int, kv_dtype: str = "f32") -> int:
    return 2 * n_layer * kv_dim * np.dtype(KV_DTYPES[check_kv_dtype(kv_dtype)]).itemsize


class KVCache:
    def __init__(self, *, n_layer: int, n_kv_heads: int, head_dim: int, max_seqs: int, max_seq_len: int,
                 n_tokens: int, block_size: int = 16, dtype: str = "f32"):
        if block_size <= 0 or max_seqs <= 0 or max_seq_len <= 0:
            raise ConfigError(f"KV cache sizes must be positive: block_size={block_size}, "
                              f"max_seqs={max_seqs}, max_seq_len={max_seq_len}")
        self.block_size = block_size
        self.dtype = check_kv_dtype(dtype)
        self.max_seq_len = max_seq_len
        self.max_blocks_per_seq = -(-max_seq_len // block_size)
        self.n_blocks = max(-(-n_tokens // block_size), self.max_blocks_per_seq)
        shape = (n_layer, self.n_blocks, n_kv_heads, block_size, head_dim)
        self.k = aligned_zeros(shape, KV_DTYPES[dtype])
        self.v = aligned_zeros(shape, KV_DTYPES[dtype])
        self.block_tables = np.full((max_seqs, self.max_blocks_per_seq), -1, np.int32)
        self._free_blocks = list(range(self.n_blocks - 1, -1, -1))     # pop() hands out low ids first
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self._n_blocks_of = np.zeros(max_seqs, np.int64)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def can_admit(self, n_tokens: int) -> bool:
        """True when a new sequence of up to n_tokens fits now (a free slot and enough free blocks)."""
        return bool(self._free_slots) and self.blocks_for(n_tokens) <= len(self._free_blocks)

    def allocate(self) -> int:
        """Take a sequence slot (a row of block_tables)."""
        if not self._free_slots:
            raise RuntimeError("no free KV slot")
        return self._free_slots.pop()

    def reserve(self, slot: int, n_tokens: int) -> None:
        """Make sure slot's sequence has blocks for positions [0, n_tokens)."""
        if n_tokens > self.max_seq_len:
            raise ContextOverflowError(f"sequence of {n_tokens} tokens exceeds the cache limit {self.max_seq_len}")
        need = self.blocks_for(n_tokens)
        have = int(self._n_blocks_of[slot])
        if need - have > len(self._free_blocks):
            raise MemoryError(f"KV cache exhausted: need {need - have} blocks, {len(self._free_blocks)} free")
        for j in range(have, need):
            self.block_tables[slot, j] = self._free_blocks.pop()
        self._n_blocks_of[slot] = max(have, need)

    def free(self, slot: int) -> None:
        """Return a sequence's blocks and slot to the pool."""
        n = int(self._n_blocks_of[slot])
        self._free_blocks.extend(int(b) for b in self.block_tables[slot, :n][::-1])
        self.block_tables[slot, :] = -1
        self._n_blocks_of[slot] = 0
        self._free_slots.append(slot)

    def prefault(self) -> None:
        """Write every page of K and V once (zeros, what they hold already), so no later write faults a page in."""
        self.k.fill(0)
        self.v.fill(0)

    def layer(self, i: int):
        """(k, v) views of layer i: [n_blocks, n_kv_heads, block_size, head_dim] (float32 or float16 bits)."""
        return self.k[i], self.v[i]
