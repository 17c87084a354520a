"""The paged KV cache: the only owner of the K/V arrays, the block tables and the prefix cache.

Memory is a pool of fixed-size blocks shared by all sequences; a sequence holds a list of blocks (its row of
``block_tables``), grown as it advances. The pool is sized once (from a token budget) so admission control can
be exact: a request is admitted only when the blocks it will need are available.

    k, v          float32 or uint16 [n_layer, n_kv_heads, n_blocks, block_size, head_dim]
    block_tables  int32   [max_seqs, max_blocks_per_seq]   (-1 = unassigned)

KV head major, so that consecutive blocks are one run of each KV head's rows: the free list hands out low ids
first and takes a finished sequence's blocks back as a run, and the scheduler reserves a request's blocks at
once, so a request's rows are mostly a few long runs, which attention streams (jit_kernels.attention).

``dtype`` "f32" (default) keeps K/V in float32, the BitNet spec's numerics; "f16" keeps IEEE float16 bits in
uint16 (half the memory; what llama.cpp and bitnet.cpp use by default; rounding rules in
``jit_kernels.attention``).

Prefix caching (``prefix_cache=True``): a full block of prompt tokens, once computed, is registered under a
hash chained over (parent block's hash, the block's token ids), rooted in ``salt`` (what else decides K/V
contents: model file, KV dtype, FFN activation). A later sequence whose prompt starts with the same blocks maps
them into its own table (``share``) instead of computing them. Shared blocks are reference counted and never
written: a sequence writes only positions past its shared blocks (the engine checks). A registered block whose
last reader is gone stays cached until the pool needs it (evicted least recently used first; a finished
sequence's blocks go on the list tail first, so a prefix loses its end before its start). Blocks being computed
right now are "pending" under the computing slot, so the scheduler can wait for them instead of computing them
twice. Because every row's K/V depends only on the tokens at and before it, a mapped block holds exactly what a
fresh prefill would have written.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from jit_kernels.buffers import aligned_zeros

from ..config import KV_DTYPES, check_kv_dtype
from ..errors import ConfigError, ContextOverflowError

def kv_bytes_per_token(n_layer: int, kv_dim: int, kv_dtype: str = "f32") -> int:
    return 2 * n_layer * kv_dim * np.dtype(KV_DTYPES[check_kv_dtype(kv_dtype)]).itemsize


def block_hashes(tokens, block_size: int, salt: bytes = b"") -> list[bytes]:
    """The chained hashes of the full blocks of ``tokens``: block j's hash covers tokens [0, (j + 1) * block_size)
    and ``salt`` (16-byte BLAKE2b digests; a collision would need ~2^64 blocks)."""
    ids = np.ascontiguousarray(tokens, dtype="<i4")
    parent = hashlib.blake2b(b"bitnet-batch/kv-block/v1\x00" + salt, digest_size=16).digest()
    out = []
    for j in range(len(ids) // block_size):
        parent = hashlib.blake2b(parent + ids[j * block_size:(j + 1) * block_size].tobytes(), digest_size=16).digest()
        out.append(parent)
    return out


class KVCache:
    def __init__(self, *, n_layer: int, n_kv_heads: int, head_dim: int, max_seqs: int, max_seq_len: int,
                 n_tokens: int, block_size: int = 16, dtype: str = "f32", prefix_cache: bool = False,
                 salt: bytes = b""):
        if block_size <= 0 or max_seqs <= 0 or max_seq_len <= 0:
            raise ConfigError(f"KV cache sizes must be positive: block_size={block_size}, "
                              f"max_seqs={max_seqs}, max_seq_len={max_seq_len}")
        self.block_size = block_size
        self.dtype = check_kv_dtype(dtype)
        self.max_seq_len = max_seq_len
        self.prefix_cache = bool(prefix_cache)
        self.salt = bytes(salt)
        self.max_blocks_per_seq = -(-max_seq_len // block_size)
        self.n_blocks = max(-(-n_tokens // block_size), self.max_blocks_per_seq)
        shape = (n_layer, n_kv_heads, self.n_blocks, block_size, head_dim)    # KV head major (jit_kernels.attention)
        self.k = aligned_zeros(shape, KV_DTYPES[dtype])
        self.v = aligned_zeros(shape, KV_DTYPES[dtype])
        self.block_tables = np.full((max_seqs, self.max_blocks_per_seq), -1, np.int32)
        self._free_blocks = list(range(self.n_blocks - 1, -1, -1))     # pop() hands out low ids first
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self._n_blocks_of = np.zeros(max_seqs, np.int64)
        self._refs = np.zeros(self.n_blocks, np.int32)         # sequences holding each block
        self._block_of: dict[bytes, int] = {}                  # hash -> registered block
        self._hash_of: dict[int, bytes] = {}                   # registered block -> hash
        self._idle: OrderedDict[int, None] = OrderedDict()    # registered blocks with no reader, LRU first
        self._pending: dict[bytes, int] = {}                   # hash -> slot computing that block now
        self._pending_of: dict[int, list[bytes]] = {}
        self._shared_of = np.zeros(max_seqs, np.int64)         # leading blocks a slot maps from the cache
        self._registered_of = np.zeros(max_seqs, np.int64)     # leading blocks of a slot that are registered

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def free_blocks(self) -> int:
        """Blocks a new sequence can take: never used or freed, plus cached blocks no sequence reads."""
        return len(self._free_blocks) + len(self._idle)

    @property
    def cached_blocks(self) -> int:
        """Registered blocks (read by sequences or idle)."""
        return len(self._block_of)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def hashes(self, tokens) -> list[bytes]:
        """The prefix-cache hashes of the full blocks of ``tokens`` ([] with the prefix cache off)."""
        return block_hashes(tokens, self.block_size, self.salt) if self.prefix_cache else []

    def match(self, hashes, limit: int) -> tuple[list[int], int]:
        """(the cached blocks of the longest cached run of ``hashes[:limit]``, how many of the blocks right after
        it are being computed by a running sequence)."""
        hits = []
        for h in hashes[:limit]:
            b = self._block_of.get(h)
            if b is None:
                break
            hits.append(b)
        pending = 0
        for h in hashes[len(hits):limit]:
            if h not in self._pending:
                break
            pending += 1
        return hits, pending

    def can_admit(self, n_tokens: int, hits=()) -> bool:
        """True when a new sequence of up to n_tokens fits now (a free slot and enough free blocks), mapping the
        cached blocks ``hits`` (counted once: they are not taken from the pool)."""
        idle_hits = sum(1 for b in hits if self._refs[b] == 0)
        return bool(self._free_slots) and self.blocks_for(n_tokens) - len(hits) <= self.free_blocks - idle_hits

    def allocate(self) -> int:
        """Take a sequence slot (a row of block_tables)."""
        if not self._free_slots:
            raise RuntimeError("no free KV slot")
        return self._free_slots.pop()

    def share(self, slot: int, hits, hashes=()) -> None:
        """Map the cached blocks ``hits`` as the first blocks of a fresh slot (read only), and mark the slot's
        later blocks of ``hashes`` that no one has cached or is computing as pending under it."""
        if self._n_blocks_of[slot]:
            raise RuntimeError(f"slot {slot} already holds blocks")
        for j, b in enumerate(hits):
            if self._refs[b] == 0:
                del self._idle[b]
            self._refs[b] += 1
            self.block_tables[slot, j] = b
        n = len(hits)
        self._n_blocks_of[slot] = self._shared_of[slot] = self._registered_of[slot] = n
        mine = [h for h in hashes[n:] if h not in self._block_of and h not in self._pending]
        for h in mine:
            self._pending[h] = slot
        if mine:
            self._pending_of[slot] = mine

    def shared_tokens(self, slot: int) -> int:
        """Positions [0, shared_tokens) of the slot are cached blocks it must not write."""
        return int(self._shared_of[slot]) * self.block_size

    def reserve(self, slot: int, n_tokens: int) -> None:
        """Make sure slot's sequence has blocks for positions [0, n_tokens)."""
        if n_tokens > self.max_seq_len:
            raise ContextOverflowError(f"sequence of {n_tokens} tokens exceeds the cache limit {self.max_seq_len}")
        need = self.blocks_for(n_tokens)
        have = int(self._n_blocks_of[slot])
        if need - have > self.free_blocks:
            raise MemoryError(f"KV cache exhausted: need {need - have} blocks, {self.free_blocks} free")
        for j in range(have, need):
            b = self._take()
            self._refs[b] = 1
            self.block_tables[slot, j] = b
        self._n_blocks_of[slot] = max(have, need)

    def _take(self) -> int:
        if self._free_blocks:
            return self._free_blocks.pop()
        b, _ = self._idle.popitem(last=False)        # evict the least recently used idle cached block
        del self._block_of[self._hash_of.pop(b)]
        return b

    def register(self, slot: int, hashes, n_blocks: int) -> None:
        """The slot's first ``n_blocks`` blocks now hold the K/V of ``hashes[:n_blocks]``: cache them (a block
        whose hash another block already holds stays private)."""
        n_blocks = min(n_blocks, len(hashes), int(self._n_blocks_of[slot]))
        for j in range(int(self._registered_of[slot]), n_blocks):
            h = hashes[j]
            if self._pending.get(h) == slot:
                del self._pending[h]
            if h not in self._block_of:
                b = int(self.block_tables[slot, j])
                self._block_of[h] = b
                self._hash_of[b] = h
        self._registered_of[slot] = max(int(self._registered_of[slot]), n_blocks)

    def free(self, slot: int) -> None:
        """Release a sequence's blocks and slot: a block nobody else reads goes back to the pool, or to the idle
        list when it is cached."""
        n = int(self._n_blocks_of[slot])
        for b in self.block_tables[slot, :n][::-1].tolist():
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._idle[b] = None
                else:
                    self._free_blocks.append(b)
        for h in self._pending_of.pop(slot, ()):
            if self._pending.get(h) == slot:
                del self._pending[h]
        self.block_tables[slot, :] = -1
        self._n_blocks_of[slot] = self._shared_of[slot] = self._registered_of[slot] = 0
        self._free_slots.append(slot)

    def prefault(self) -> None:
        """Write every page of K and V once (zeros, what they hold already), so no later write faults a page in."""
        self.k.fill(0)
        self.v.fill(0)

    def layer(self, i: int):
        """(k, v) views of layer i: [n_kv_heads, n_blocks, block_size, head_dim] (float32 or float16 bits)."""
        return self.k[i], self.v[i]
