"""The engine: model weights + paged KV cache + workspace, advanced one step at a time.

A step takes parts ``(slot, tokens, start_pos, want_logits)``: a prefill chunk or a single decode token
of one sequence each. All parts run as one batch of rows through every kernel (each weight matrix is read
once per step) and the logits of the last row of each part that wants them come back in order (for a part that
wants only their argmax, greedy sampling: the float32 logits of the candidates for it, ``model.argmax_head``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numba
import numpy as np

from ..config import EngineConfig
from ..errors import ConfigError
from ..model.argmax_head import ArgmaxHead, argmax_screen_for
from ..model.bitnet import RopeTable, StepBatch, forward
from .kv_cache import KVCache, kv_bytes_per_token
from .workspace import Workspace


def default_kv_budget_mb() -> float:
    """A quarter of the memory available now (at least 256 MiB, at most 8 GiB). The pool is allocated lazily
    (untouched pages cost nothing), so this bounds admission rather than reserving memory up front."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (ValueError, OSError, AttributeError):
        avail = 8192.0
    return float(min(max(avail / 4, 256.0), 8192.0))


def kv_salt(model, kv_dtype: str) -> bytes:
    """What, besides the tokens, decides the K/V a prefix block holds: the model file (path, size, mtime), the
    KV storage type and the FFN activation (an override changes every layer after the first)."""
    path = Path(model.path)
    try:
        st = path.stat()
        ident = f"{path.resolve()}\x00{st.st_size}\x00{st.st_mtime_ns}"
    except OSError:
        ident = str(path)
    return f"{ident}\x00{kv_dtype}\x00{model.config.ffn_act}".encode()


class Engine:
    def __init__(self, model, config: EngineConfig = EngineConfig(), *, logit_rows: int = 0):
        """``logit_rows``: most rows whose logits one step returns (default: max_batch, one per sequence;
        ``all_logits`` works in chunks of that many rows).

        ``config.prefault_kv`` writes the whole KV pool once here (``kv_prefault_s`` says how long it took), as
        llama.cpp clears its KV buffer when it creates a context. The first write to a page the OS has not
        handed out before costs ~0.5 us per 4 KiB on bare metal and ~13 us in the VMs this was measured on,
        where it otherwise lands in the decode steps that first reach each block (~30 ms per 32-stream step of
        the 2B4T model). Meant for a pool sized to the job, as the bench's is: the default pool is a budget that
        can be far larger than what a job touches."""
        cfg = model.config
        if getattr(model, "embedding_only", False):
            raise ConfigError(f"{model.path}: an embedding model ({cfg.arch}, no lm_head) generates and scores "
                              f"nothing; use `bitnet-batch embed`")
        self.model = model
        self.config = config
        if config.threads:
            numba.set_num_threads(min(config.threads, numba.config.NUMBA_NUM_THREADS))
        self.max_seq_len = min(config.max_seq_len or cfg.n_ctx, cfg.n_ctx)
        per_token = kv_bytes_per_token(cfg.n_layer, cfg.kv_dim, config.kv_dtype)
        if config.kv_cache_mb:
            n_tokens = int(config.kv_cache_mb * 2**20 // per_token)
        else:
            seq_blocks = -(-self.max_seq_len // config.block_size)
            n_tokens = min(config.max_batch * seq_blocks * config.block_size,
                           int(default_kv_budget_mb() * 2**20 // per_token))
        if n_tokens < config.block_size:
            raise ConfigError(f"kv_cache_mb={config.kv_cache_mb} holds {n_tokens} tokens, less than one block")
        self.max_seq_len = min(self.max_seq_len, n_tokens - n_tokens % config.block_size)   # one sequence fits
        self.kv = KVCache(n_layer=cfg.n_layer, n_kv_heads=cfg.n_head_kv, head_dim=cfg.head_dim,
                          max_seqs=config.max_batch, max_seq_len=self.max_seq_len, n_tokens=n_tokens,
                          block_size=config.block_size, dtype=config.kv_dtype, prefix_cache=config.prefix_cache,
                          salt=kv_salt(model, config.kv_dtype))
        self.kv_prefault_s = 0.0
        if config.prefault_kv:
            t0 = time.perf_counter()
            self.kv.prefault()
            self.kv_prefault_s = time.perf_counter() - t0
        self.max_rows = max(config.prefill_chunk, config.max_batch)
        # the lm_head table rounded to bfloat16 (opt-in numerics; shared by the model's engines)
        self.lm_bf16 = model.bf16_lm_head() if config.lm_head_dtype == "bf16" else None
        self.ws = Workspace(cfg, self.max_rows, logit_rows or config.max_batch, self.max_seq_len,
                            lm_head_bf16=self.lm_bf16 is not None)
        # rows that want only their argmax (greedy sampling): the exact argmax through a screen (``argmax_head``;
        # 2B4T table, Zen 4, 2 threads, int8 dots: 32 rows 58 against 113 ms, one row 12 against 15-20)
        screen = argmax_screen_for(config.argmax_head, model) if self.lm_bf16 is None else None
        self.argmax_head = ArgmaxHead(model, self.ws.max_logit_rows, screen) if screen else None
        self.rope = RopeTable(cfg, self.max_seq_len)
        self.steps = 0
        self.busy_s = 0.0

    def step(self, parts):
        """parts: list of (slot, tokens int32 [n], start_pos, want). ``want``: False (no logits), True (the
        logits of the part's last token: float32 [n_vocab]), "argmax" (the same, for a caller that takes only
        their argmax, first index among equal maxima: with ``argmax_head`` only the float32 logits of the
        candidates for it are computed, the others are -inf), ("argmax", mask) (the argmax among the tokens of a
        bitmask, int32 words [ceil(V/32)], bit j of word i allowing id 32 i + j: the candidates are among them),
        ("top_k", k, mask) (the same for a caller that takes the k largest logits alone: every token among them is
        a candidate; mask None or a bitmask) or "all" (every token's: float32 [n, n_vocab]).
        Returns one entry per part (views valid until the next step) or None."""
        n = sum(len(p[1]) for p in parts)
        if n > self.max_rows:
            raise ValueError(f"step of {n} rows exceeds max_rows {self.max_rows}")
        tokens = np.empty(n, np.int32)
        row_seq = np.empty(n, np.int32)
        row_pos = np.empty(n, np.int32)
        logit_rows, argmax_rows, argmax_masks, argmax_ks, spans, r = [], [], [], [], [], 0
        for slot, toks, start, want in parts:
            m = len(toks)
            if start < self.kv.shared_tokens(slot):
                raise RuntimeError(f"slot {slot}: a step may not write position {start}, which lies in a shared "
                                   f"prefix block")
            self.kv.reserve(slot, start + m)
            tokens[r:r + m] = toks
            row_seq[r:r + m] = slot
            row_pos[r:r + m] = np.arange(start, start + m, dtype=np.int32)
            k, mask = 1, None
            if isinstance(want, tuple):              # ("argmax", mask) or ("top_k", k, mask)
                k, mask = (want[1], want[2]) if want[0] == "top_k" else (1, want[1])
                want = "argmax"
            if want == "argmax" and self.argmax_head is not None:
                spans.append(("argmax", len(argmax_rows)))
                argmax_rows.append(r + m - 1)
                argmax_masks.append(mask)
                argmax_ks.append(k)
            else:
                spans.append(wanted_rows(want, r, m, logit_rows))
            r += m
        spans = [len(logit_rows) + sp[1] if isinstance(sp, tuple) and sp[0] == "argmax" else sp for sp in spans]
        t0 = time.perf_counter()
        logits = forward(self.model.weights, self.model.config, self.ws, self.kv, self.rope,
                         StepBatch(tokens, row_seq, row_pos, np.asarray(logit_rows + argmax_rows, np.int32)),
                         self.lm_bf16, self.argmax_head, len(argmax_rows), argmax_masks, argmax_ks)
        self.busy_s += time.perf_counter() - t0
        self.steps += 1
        return part_outputs(logits, spans)

    def all_logits(self, slot: int, tokens: np.ndarray, start: int = 0) -> np.ndarray:
        """Logits at every position of tokens (prefill in chunks); float32 [len(tokens), n_vocab], a copy."""
        cfg = self.model.config
        T = len(tokens)
        out = np.empty((T, cfg.n_vocab), np.float32)
        chunk = min(self.max_rows, self.ws.max_logit_rows)
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            m = c1 - c0
            self.kv.reserve(slot, start + c1)
            batch = StepBatch(np.ascontiguousarray(tokens[c0:c1], np.int32), np.full(m, slot, np.int32),
                              np.arange(start + c0, start + c1, dtype=np.int32), np.arange(m, dtype=np.int32))
            out[c0:c1] = forward(self.model.weights, cfg, self.ws, self.kv, self.rope, batch, self.lm_bf16)
        return out


def wanted_rows(want, r: int, m: int, rows: list):
    """Add to ``rows`` the rows of a part (its m rows start at step row r) whose outputs ``want`` asks for: "all",
    True (its last row) or False (none). Returns where they lie in ``rows``: (j0, j1), j or None."""
    j = len(rows)
    if want == "all":
        rows.extend(range(r, r + m))
        return j, j + m
    if want:
        rows.append(r + m - 1)
        return j
    return None


def part_outputs(out: np.ndarray, spans: list) -> list:
    """Each part's outputs from a step's ``out`` (one row per wanted row): None, a row, or a block of rows."""
    return [None if sp is None else out[sp] if isinstance(sp, int) else out[sp[0]:sp[1]] for sp in spans]
