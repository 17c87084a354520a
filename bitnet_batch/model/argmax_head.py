"""The lm_head for logit rows of which only the argmax is wanted (greedy sampling without penalties or logprobs;
under a constraint or ``ignore_eos``, the argmax among the tokens its mask allows): the float32 argmax at the speed
of a cheaper screen.

A screen computes approximate logits within a proven bound of the float32 ones, which leaves a few candidates for
the maximum (``jit_kernels.argmax_screen``); their float32 logits are computed exactly as the whole lm_head would
compute them (``embedding.lm_head_entries``), and every other entry of the row is -inf. So the row's argmax,
first index among equal maxima included, is the float32 lm_head's: the same greedy tokens, bit for bit. Screens:

- ``int8`` (``jit_kernels.lm_head_int8``; "auto" on the SIMD families): exact integer dots of int8-quantized
  rows and an int8 copy of the table, half the F16 table's bytes (one-stream decode streams the table from
  memory) and, with VNNI, 64 multiply-adds per instruction. Its bound is about twice the bf16 one's, so a row has more
  candidates (~600 a row on the flat logits of a random-weight 2B4T model, ~2 on the shipped trained model).
  2B4T table, 2 threads, Zen 4, that random model: 1 / 8 / 32 rows 12-14 / 25 / 58 ms against 15-24 / 39 / 113
  for the float32 lm_head and 22 / 31 / 72 through the bf16 screen.
- ``bf16`` (``jit_kernels.lm_head_bf16``): bfloat16 logits (``vdpbf16ps`` on AVX512_BF16 CPUs), a bound of
  ~0.8% of ||x|| ||w|| whatever the values (the int8 one widens when a few outliers set a table row's scale; a
  logit row's outliers are kept apart, ``lm_head_int8``).

Under "auto" a job stops sending greedy (or top-k) rows here once they cost more than the float32 lm_head would
(``argmax_pays``, ``top_k_pays``), and lets the screen table go when no kind of row pays
(``retire_if_unpaying``): a guard for models whose final rows the screen cannot narrow.
"""
from __future__ import annotations

import os
import weakref

import numba
import numpy as np

from jit_kernels import argmax_screen
from jit_kernels import embedding as emb_k
from jit_kernels import lm_head_bf16, lm_head_int8
from jit_kernels.buffers import aligned_zeros, read_rows

from ..sampling.params import TOP_K_ONLY_MAX
from .gguf import mapped_file_range, release_array_pages

SCREENS = ("bf16", "int8")
# candidates per row beyond which a row takes the whole float32 lm_head instead (~1 us a candidate row read and
# computed, against ~3.5 ms for a row of 32 of the whole lm_head, ~15-20 ms for one row alone)
MAX_CANDIDATES = {"bf16": 1024, "int8": 4096}
TRIAL = 32                 # rows of a kind (argmax, top-k) over which ``argmax_pays`` / ``top_k_pays`` judge at least
PAYING_CANDIDATES = 2048   # ... their cost per row in candidates against this: the screen saves ~2-7 ms a row (2B4T
                           # table, 2 threads, Zen 4: one row 12 against 17-20 ms, 32 rows 58 against 113 ms), a
                           # candidate costs ~1 us
FULL_ROW_COST = 8192       # a row that takes the whole float32 lm_head, in candidates (~8 ms a row when 32 rows
                           # share the table's reads, ~100 ms for one row alone)


# "auto" screens lm_head tables of at least this many entries: below it the whole float32 lm_head takes well under
# a millisecond, less than the screen's own work per step (the shipped 4.2M-parameter model: greedy decode ~20%
# slower through it)
AUTO_MIN_ENTRIES = 1 << 24


def argmax_screen_for(setting: str, model) -> str | None:
    """The screen of an engine's argmax lm_head (None: the engine has none). ``setting``
    (``EngineConfig.argmax_head``): "auto" int8 where its SIMD tiles run (``vpdpbusd`` or ``vpmaddubsw``) and the
    table has AUTO_MIN_ENTRIES or more (the faster screen at every batch size measured, and the smaller table);
    "on" int8 wherever the SIMD lm_head runs, any table (the same tokens, not always faster); "bf16" / "int8" that
    one; "off" none."""
    table = model.weights.output
    if setting == "off" or not emb_k.simd_table(table):
        return None
    if setting in SCREENS:
        return setting
    return "int8" if setting == "on" or (lm_head_int8.has_fast_path() and table.size >= AUTO_MIN_ENTRIES) else None


ROWS_AT_ONCE = 4096        # table rows read into memory at a time (20 MB of 2B4T F16 rows)


class _FileRows:
    """Rows of a table that lives in a file mapping, read with ``pread`` into a buffer of this process's (at most
    ROWS_AT_ONCE rows): the candidates of a step are a few hundred to a few thousand scattered rows, and reading
    them through the mapping would map the pages around each (the kernel's fault-around, 64 KB) until the file's
    table, whose pages the screen table's making released, is resident again beside that copy."""

    def __init__(self, table: np.ndarray, path: str, offset: int):
        self.path, self.offset = path, offset
        self.row_bytes = table.shape[1] * table.itemsize
        self.buf = np.empty((ROWS_AT_ONCE, table.shape[1]), table.dtype)    # pages touched as rows come
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        weakref.finalize(self, os.close, self.fd)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The table rows ``rows`` (int64, at most ROWS_AT_ONCE), as a [len(rows), D] array (valid until the next
        call)."""
        buf = self.buf[:len(rows)]
        short = read_rows(self.fd, self.offset, rows, buf)
        if short:
            raise OSError(f"{self.path}: {short} of {len(rows)} lm_head rows read short (the file changed?)")
        return buf

    def span(self, lo: int, hi: int) -> np.ndarray:
        """Table rows [lo, hi) (at most ROWS_AT_ONCE), in one read."""
        buf = self.buf[:hi - lo]
        if os.preadv(self.fd, [buf], self.offset + lo * self.row_bytes) != buf.nbytes:
            raise OSError(f"{self.path}: lm_head rows {lo}-{hi} read short (the file changed?)")
        return buf


class ArgmaxHead:
    """Buffers and tables for up to ``max_rows`` argmax rows per step (one engine's), through ``screen``. The
    screen's table (the model's, shared by its engines) is made on the first call (``prepare``): in a job that is
    the warm-up, after the kernels that make it were compiled or loaded from the cache."""

    def __init__(self, model, max_rows: int, screen: str = "int8"):
        if screen not in SCREENS:
            raise ValueError(f"argmax lm_head screen must be one of {', '.join(SCREENS)}, got {screen!r}")
        w = model.weights
        self.model, self.screen = model, screen
        self.table, self.kind = w.output, w.output_kind
        self.bf16 = self.wnorm = self.int8 = None
        mapped = mapped_file_range(self.table)
        self.file_rows = _FileRows(self.table, *mapped) if mapped is not None else None
        V, D = self.table.shape
        n_threads = numba.config.NUMBA_NUM_THREADS
        self.lm_scratch = emb_k.lm_head_scratch(n_threads, D)
        if screen == "bf16":
            Dp = lm_head_bf16.padded_dim(D)
            self.c = lm_head_bf16.argmax_bound(D)
            self.xb = aligned_zeros((max_rows, Dp), np.uint16)
            self.xr = aligned_zeros((max_rows, Dp), np.float32)
            self.scratch = lm_head_bf16.scratch(n_threads, D)
            self.zeros = np.zeros(V)
        else:
            self.xq = aligned_zeros((max_rows, lm_head_int8.padded_dim(D)), np.int8)
            self.xsum = np.zeros(max_rows, np.int32)
            self.odims = np.zeros((max_rows, lm_head_int8.OUTLIERS), np.int64)
            self.ocoef = np.zeros((max_rows, lm_head_int8.OUTLIERS), np.int32)
        self.xscale, self.P, self.Q = np.zeros((3, max_rows))
        self.cand = np.zeros((max_rows, MAX_CANDIDATES[screen]), np.int64)
        self.allowed = np.full((max_rows, -(-V // 32)), -1, np.int32)   # all tokens
        self.ks = np.ones(max_rows, np.int64)                            # the argmax
        self.best = np.zeros((max_rows, TOP_K_ONLY_MAX), np.float64)
        self.counts = np.zeros(max_rows, np.int64)
        self.retired = False       # ``retire_if_unpaying``: no kind of row pays here, the screen table is gone
        self.reset_counts()

    def reset_counts(self) -> None:
        """Zero the counters (the warm-up's rows are not a job's)."""
        self.candidates = 0        # candidates computed exactly, rows that took the whole float32 lm_head
        self.full_rows = 0
        self.argmax_rows = 0       # rows of k = 1 and their cost in candidates (``argmax_pays``), the same for
        self.argmax_cost = 0       # the rows of k > 1 (top-k sampling; ``top_k_pays``)
        self.top_k_rows = 0
        self.top_k_cost = 0

    def prepare(self) -> None:
        """Make (or take the model's) screen table."""
        if self.bf16 is None and self.int8 is None:
            if self.screen == "bf16":
                self.bf16 = self.model.bf16_lm_head()
                self.wnorm = self.model.bf16_row_norms()
            else:
                self.int8 = self.model.int8_lm_head()
            release_array_pages(self.table)     # the file's table, should a float32 lm_head have read it since

    def _screen(self, x: np.ndarray, out: np.ndarray, cand, counts, allowed, ks) -> None:
        """The screen's logits of x and its candidates (``argmax_screen.argmax_candidates``)."""
        R = x.shape[0]
        xscale, P, Q = self.xscale[:R], self.P[:R], self.Q[:R]
        if self.screen == "bf16":
            xb, xr = self.xb[:R], self.xr[:R]
            lm_head_bf16.round_rows(x, xb, xr)
            lm_head_bf16.lm_head_bf16(xb, xr, self.bf16, self.scratch, out)
            xnorm = np.sqrt(np.einsum("rd,rd->r", x, x, dtype=np.float64)) * (1.0 + 1e-12)
            xscale[:], P[:], Q[:] = 1.0, 0.0, self.c * xnorm
            argmax_screen.argmax_candidates(out, xscale, self.zeros[:0], P, self.zeros, Q, self.wnorm, cand, counts,
                                            allowed, ks, self.best, out)
        else:
            t = self.int8
            xq, xsum, odims, ocoef, dots = self.xq[:R], self.xsum[:R], self.odims[:R], self.ocoef[:R], \
                out[:R].view(np.int32)
            lm_head_int8.quantize_rows(x, xq, xsum, xscale, P, Q, odims, ocoef)
            lm_head_int8.lm_head_int8(xq, xsum, odims, ocoef, t.codes, dots)
            argmax_screen.argmax_candidates(dots, xscale, t.scale, P, t.enorm, Q, t.wnorm, cand, counts, allowed,
                                            ks, self.best, out)

    def __call__(self, x: np.ndarray, out: np.ndarray, masks=None, ks=None) -> None:
        """out[:R] <- for each row of x (float32 [R, D]), its float32 logits at the candidates for its maximum (or
        its ks[r] largest) and -inf elsewhere (or all of them, for a row whose candidates could not be narrowed).
        ``masks``: for each row None or a bitmask (int32 words, bit j of word i: token 32 i + j) of the tokens the
        maximum is taken among."""
        self.prepare()
        R = x.shape[0]
        allowed, kk = self.allowed[:R], self.ks[:R]
        for r in range(R):
            mask = None if masks is None else masks[r]
            allowed[r] = -1 if mask is None else mask
            kk[r] = 1 if ks is None else ks[r]
        counts, cand = self.counts[:R], self.cand[:R]
        self._screen(x, out, cand, counts, allowed, kk)
        full = np.flatnonzero(counts < 0)
        if len(full):
            self.full_logits(x[full], out, full)
        n = np.maximum(counts, 0)
        rows = np.repeat(np.arange(R, dtype=np.int64), n)
        cols = cand[np.arange(cand.shape[1])[None, :] < n[:, None]]
        if self.file_rows is None:
            emb_k.lm_head_entries(x, self.table, self.kind, rows, cols, out)
        else:           # the candidates' table rows, ROWS_AT_ONCE distinct ones at a time
            unique, index = np.unique(cols, return_inverse=True)
            order = np.argsort(index, kind="stable")
            ends = np.searchsorted(index[order], np.arange(0, len(unique) + ROWS_AT_ONCE, ROWS_AT_ONCE)[1:])
            start = 0
            for c, end in enumerate(ends):
                sel = order[start:end]
                part = self.file_rows.read(unique[c * ROWS_AT_ONCE:(c + 1) * ROWS_AT_ONCE])
                emb_k.lm_head_entries(x, part, self.kind, rows[sel], index[sel] - c * ROWS_AT_ONCE, out,
                                      dest=cols[sel])
                start = end
        self.candidates += int(n.sum())
        self.full_rows += int((counts < 0).sum())
        top, cost = kk > 1, np.where(counts < 0, FULL_ROW_COST, n)
        self.argmax_rows += int(R - top.sum())
        self.argmax_cost += int(cost[~top].sum())
        self.top_k_rows += int(top.sum())
        self.top_k_cost += int(cost[top].sum())

    def full_logits(self, x: np.ndarray, out: np.ndarray, rows) -> None:
        """out[rows[i]] <- the float32 logits of x[i] (float32 [n, D]), every one: for the rows the screen could not
        narrow. A table in a file is read ROWS_AT_ONCE rows at a time (the same logits: each is one dot in a fixed
        order), so that its pages, released when the screen table was made, stay out of memory."""
        x = np.ascontiguousarray(x)
        if self.file_rows is None:
            part = np.empty((len(x), out.shape[1]), np.float32)
            emb_k.lm_head(x, self.table, self.kind, self.lm_scratch, part)
            out[rows] = part
            return
        V = self.table.shape[0]
        buf = np.empty(len(x) * ROWS_AT_ONCE, np.float32)
        for lo in range(0, V, ROWS_AT_ONCE):
            hi = min(V, lo + ROWS_AT_ONCE)
            part = buf[:len(x) * (hi - lo)].reshape(len(x), hi - lo)       # C-contiguous, as every other call's
            emb_k.lm_head(x, self.file_rows.span(lo, hi), self.kind, self.lm_scratch, part)
            out[rows, lo:hi] = part

    @property
    def rows(self) -> int:
        """Rows computed here (argmax and top-k)."""
        return self.argmax_rows + self.top_k_rows

    def _pays(self, rows: int, cost: int) -> bool:
        return not self.retired and cost <= PAYING_CANDIDATES * max(rows, TRIAL)

    @property
    def argmax_pays(self) -> bool:
        """Whether "auto" still sends argmax rows here: while their cost averages at most PAYING_CANDIDATES
        candidates a row (a row that took the whole float32 lm_head counting FULL_ROW_COST), judged over TRIAL rows
        at least (so at most TRIAL PAYING_CANDIDATES / FULL_ROW_COST = 8 whole rows are tried): a model whose final
        rows the screen cannot narrow (none measured so far) then gets the float32 lm_head, as with "off", and the
        same tokens."""
        return self._pays(self.argmax_rows, self.argmax_cost)

    @property
    def top_k_pays(self) -> bool:
        """The same for top-k rows, whose candidates depend more on the model: about k where its logits are peaked
        (a trained Shakespeare model, k = 40: ~50 a row), but thousands where they are flat (a random-weight 2B4T
        model, k = 40: more than 4096 a row, every row the whole float32 lm_head)."""
        return self._pays(self.top_k_rows, self.top_k_cost)

    def retire_if_unpaying(self) -> bool:
        """Once a kind of row (argmax, top-k) has stopped paying and no kind that came still does, let the screen
        table go (the float32 lm_head, which the caller then uses, brings the F16 table back into memory: both
        would count otherwise, +328 MB for 2B4T); ``argmax_pays`` and ``top_k_pays`` are False from then on.
        Returns ``retired``."""
        if not self.retired:
            kinds = ((self.argmax_rows, self.argmax_pays), (self.top_k_rows, self.top_k_pays))
            if any(rows and not pays for rows, pays in kinds) and not any(rows and pays for rows, pays in kinds):
                self.retired = True
                self.int8 = self.bf16 = self.wnorm = None
                self.model.drop_lm_head_copies()
        return self.retired
