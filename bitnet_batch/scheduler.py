"""Continuous batching: the waiting queue, admission under slot and KV-block budgets, step plans, retirement.

Every step runs all decoding sequences (one row each) plus prefill chunks of newly admitted ones, filling
the step's row budget; a sequence is admitted only when a KV slot is free and the blocks for its whole
prompt + generation budget can be reserved, so a running sequence never runs out of cache. Finished
sequences are retired (slot and blocks returned) after every step and waiting ones admitted in their place.
The scheduler owns this bookkeeping only: it never touches logits, tokens' meaning or output.
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

    @property
    def n_tokens(self) -> int:
        return len(self.prompt) + self.max_new

    @property
    def prefilling(self) -> bool:
        return self.n_prefilled < len(self.prompt)


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
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots, in arrival order, while their KV blocks fit."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch and self.kv.can_admit(self.waiting[0].n_tokens):
            seq = self.waiting.popleft()
            seq.slot = self.kv.allocate()
            self.kv.reserve(seq.slot, seq.n_tokens)
            seq.t_admit = time.perf_counter()
            self.running.append(seq)
            admitted.append(seq)
        if self.waiting and not self.running:
            need = self.waiting[0].n_tokens
            raise MemoryError(f"a sequence of {need} tokens cannot fit the KV cache even when it is empty "
                              f"({self.kv.n_blocks} blocks of {self.kv.block_size})")
        return admitted

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
