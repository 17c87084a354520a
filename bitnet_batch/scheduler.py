"""Continuous batching: the waiting queue, admission under slot and KV-block budgets, step plans, retirement.

Every step runs all decoding sequences (one row each) plus prefill chunks of newly admitted ones, filling
the step's row budget; a sequence is admitted only when a KV slot is free and the blocks for its whole
prompt + generation budget can be reserved, so a running sequence never runs out of cache. Finished
sequences are retired (slot and blocks returned) after every step and waiting ones admitted in their place.
The scheduler owns this bookkeeping only: it never touches logits, tokens' meaning or output.

With the KV cache's prefix caching on, admission is prefix-aware: a sequence maps the cached blocks its prompt
starts with and prefills only the rest (``Sequence.n_cached``); among the waiting sequences (a bounded window,
as the runner reads ahead) those with cached blocks go first; a sequence whose next prompt blocks another
running sequence is computing right now waits for them (computed once, not by every sequence that shares them);
and after each step ``commit`` registers the full prompt blocks the step completed. A sequence passed over
``max_batch`` times is taken next in any case, so a preference never starves anyone.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .engine.kv_cache import KVCache


@dataclass
class Sequence:
    """One request in flight: its tokens and timing; the runner owns the sampler/detokenizer in ``state``."""
    key: int                        # unique key (input index * n_samples + sample index)
    prompt: np.ndarray              # int32 [P] prompt token ids
    max_new: int                    # generation budget (already clamped to the context)
    state: object = None            # the runner's per-request state (sampler, stop matcher, text, ...)
    slot: int = -1                  # KV slot while admitted
    n_prefilled: int = 0            # prompt tokens already in the cache
    generated: list = field(default_factory=list)   # sampled token ids
    t_enqueue: float = 0.0
    t_admit: float = 0.0
    t_first: float = 0.0            # first token sampled (end of prefill)
    finished: bool = False
    cache_limit: int | None = None  # most leading prompt tokens that may come from the prefix cache; None ->
                                    # all but the last (its logits are needed); a scorer wants earlier rows
    hashes: list = field(default_factory=list)     # prefix-cache hashes of the prompt's full blocks
    n_cached: int = 0               # prompt tokens served from the prefix cache (not computed)
    passed_over: int = 0            # admissions that preferred a later sequence over this one

    @property
    def n_tokens(self) -> int:
        return len(self.prompt) + self.max_new

    @property
    def prefilling(self) -> bool:
        return self.n_prefilled < len(self.prompt)

    @property
    def cacheable(self) -> int:
        """Leading prompt tokens that may be served from the prefix cache."""
        limit = len(self.prompt) - 1 if self.cache_limit is None else self.cache_limit
        return max(0, min(limit, len(self.prompt) - 1))


@dataclass
class Part:
    """The rows one sequence contributes to a step."""
    seq: Sequence
    tokens: np.ndarray              # int32 [n]
    start: int                      # position of tokens[0]
    want_logits: bool               # True when the step ends the prompt, or for a decode row


class Scheduler:
    def __init__(self, kv: KVCache, max_batch: int, row_budget: int):
        self.kv = kv
        self.max_batch = max_batch
        self.row_budget = max(row_budget, max_batch)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        if seq.n_tokens > self.kv.max_seq_len:
            raise ValueError(f"sequence needs {seq.n_tokens} positions, the cache holds {self.kv.max_seq_len}")
        seq.t_enqueue = seq.t_enqueue or time.perf_counter()
        seq.hashes = self.kv.hashes(seq.prompt)
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots while their KV blocks fit (see the module doc for the order)."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            pick = self._next()
            if pick is None:                 # every waiting sequence waits for a prefix being computed
                break
            seq, hits = pick
            if not self.kv.can_admit(seq.n_tokens, hits):
                break
            self.waiting.remove(seq)
            seq.slot = self.kv.allocate()
            self.kv.share(seq.slot, hits, seq.hashes)
            self.kv.reserve(seq.slot, seq.n_tokens)
            seq.n_prefilled = seq.n_cached = len(hits) * self.kv.block_size
            seq.t_admit = time.perf_counter()
            self.running.append(seq)
            admitted.append(seq)
        if self.waiting and not self.running:
            need = self.waiting[0].n_tokens
            raise MemoryError(f"a sequence of {need} tokens cannot fit the KV cache even when it is empty "
                              f"({self.kv.n_blocks} blocks of {self.kv.block_size})")
        return admitted

    def _next(self) -> tuple[Sequence, list] | None:
        """The sequence to admit next and the cached blocks it maps: the first (in arrival order) with cached
        blocks, else the first; sequences whose next blocks are being computed wait. A sequence passed over
        ``max_batch`` times goes first."""
        if not self.kv.prefix_cache:
            return self.waiting[0], []
        first = None
        skipped = []
        for seq in self.waiting:
            hits, pending = self.kv.match(seq.hashes, seq.cacheable // self.kv.block_size)
            if pending:
                continue
            if first is None:
                first = (seq, hits)
                if hits or seq.passed_over >= self.max_batch:
                    return first
            elif hits:
                for s in skipped:
                    s.passed_over += 1
                return seq, hits
            skipped.append(seq)
        return first

    def commit(self, parts: list[Part]) -> None:
        """After the engine ran ``parts``: register the full prompt blocks they completed in the prefix cache."""
        for p in parts:
            seq = p.seq
            if seq.hashes and seq.slot >= 0 and p.start < len(seq.prompt):
                end = min(p.start + len(p.tokens), len(seq.prompt))
                self.kv.register(seq.slot, seq.hashes, end // self.kv.block_size)

    def plan(self) -> list[Part]:
        """The next step: every decoding sequence's last token, then prefill chunks in admission order."""
        parts, budget = [], self.row_budget
        for seq in self.running:
            if not seq.prefilling and not seq.finished:
                pos = len(seq.prompt) + len(seq.generated) - 1
                parts.append(Part(seq, np.array(seq.generated[-1:], np.int32), pos, True))
                budget -= 1
        for seq in self.running:
            if budget <= 0:
                break
            if seq.prefilling:
                n = min(budget, len(seq.prompt) - seq.n_prefilled)
                start = seq.n_prefilled
                parts.append(Part(seq, seq.prompt[start:start + n], start, start + n == len(seq.prompt)))
                seq.n_prefilled += n
                budget -= n
        return parts

    def retire(self, seq: Sequence) -> None:
        """Free a finished (or failed) sequence's slot and KV blocks."""
        seq.finished = True
        if seq.slot >= 0:
            self.kv.free(seq.slot)
            seq.slot = -1
        self.running.remove(seq)
