"""Batch text embeddings: text preparation, the ``Embedder`` (many texts per prefill step, pooled and normalised
vectors) and the output quantizers. This is the API the ``embed`` job calls; it never reads or writes files.

Typical use::

    model = load_model("bitnet-embeddings-0.6b-i2_s.gguf")
    ecfg = embedding_config(model)                     # pooling / normalisation / EOS rules of the model
    ids = [prepare_tokens(model, t, ecfg) for t in documents]
    ids += [prepare_tokens(model, q, ecfg, instruction="Given a web search query, retrieve ...") for q in queries]
    vecs = Embedder(model).embed(ids, pooling=ecfg.pooling, normalize=True, dimensions=256)   # float32 [n, 256]

Rules and where they come from (``docs/embeddings.md``):

- **Tokens**: ``[BOS] + encode(text) + [EOS]``, BOS when the GGUF says ``tokenizer.ggml.add_bos_token`` and EOS
  when it says ``tokenizer.ggml.add_eos_token``, as llama.cpp's tokenizer adds them (``llama-embedding``).
  bitnet.cpp's converter sets add_eos for qwen3 with EOS = ``<|endoftext|>`` (151643) "for last-token pooling"
  (``utils/convert-bitnet-embedding-to-gguf.py``); the guide: "Last-token (EOS) pooling followed by L2
  normalization".
- **Queries** get a one-sentence task instruction, documents none (guide FAQ 1; the Harrier / E5 format
  ``"Instruct: {task}\\nQuery: {text}"``): ``prepare_tokens(..., instruction=task)``.
- **Pooling** default: ``{arch}.pooling_type`` of the GGUF (the converter writes it from sentence-transformers'
  ``1_Pooling/config.json``), ``last`` when absent; for the generative BitNet models (no such key) ``mean``.
  ``last`` is the hidden state of the last token (the appended EOS), ``mean`` the mean over all tokens (BOS and EOS
  included, as llama.cpp's mean pooling), ``cls`` the first token's.
- **Normalisation**: L2, on by default. **Matryoshka** ``dimensions=N``: the first N components of the pooled
  vector, then L2-normalised (when normalising).

Batching: texts are packed into steps of up to ``max_rows`` rows (no padding: the rows of several texts share a
step and every weight matrix is read once per step); a text longer than what is left of a step continues in the
next one. Only prefill: a text's KV cache slot lives from its first rows to its last and is freed right after.
Every row's hidden state is bit-identical whatever shares its step (the engine's guarantee), and mean pooling adds
a text's rows in order one at a time, so a text's vector is bit-identical for any batch composition, step size or
order of texts.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numba
import numpy as np

from .engine.kv_cache import KVCache, check_kv_dtype
from .errors import ConfigError, ContextOverflowError, InputError, TokenizerError
from .model.bitnet import RopeTable, StepBatch
from .model.embedding_forward import (EmbeddingWorkspace, RopeTables, bitnet_hidden, embedding_hidden)

POOLINGS = ("mean", "last", "cls")
QUERY_TEMPLATE = "Instruct: {task}\nQuery: {text}"
DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"
KEY_ADD_EOS = "tokenizer.ggml.add_eos_token"


@dataclass(frozen=True)
class EmbeddingConfig:
    """What a model implies for embedding jobs (``embedding_config``); a job may override pooling / normalize."""
    pooling: str              # "mean" | "last" | "cls"
    normalize: bool           # L2-normalise the pooled vector
    dim: int                  # full embedding width (n_embd)
    add_bos: bool             # prepend BOS (tokenizer.ggml.add_bos_token)
    append_eos: bool          # append EOS (tokenizer.ggml.add_eos_token)
    bos_id: int | None
    eos_id: int | None
    max_tokens: int           # the model's context length: longest prepared text
    query_template: str | None   # how a query and its task instruction become the text to embed (None: no rule)
    embedding_model: bool     # True for the embedding architectures, False for a generative model's hidden states


def embedding_config(model) -> EmbeddingConfig:
    """The embedding defaults of a loaded model (see the module docstring for the rules and their sources)."""
    cfg = model.config
    try:
        tok = model.tokenizer
    except TokenizerError:                # a weights-only file: token ids must come prepared
        tok = None
    emb = bool(getattr(model, "embedding_only", False))
    md = model.metadata if model.gguf is not None else {}
    append_eos = bool(md.get(KEY_ADD_EOS, False))
    if append_eos and (tok is None or tok.eos_id is None):
        raise ConfigError(f"{model.path}: {KEY_ADD_EOS} is set but the vocabulary has no EOS token")
    return EmbeddingConfig(pooling=cfg.pooling if emb else "mean", normalize=True, dim=cfg.n_embd,
                           add_bos=bool(tok is not None and tok.add_bos), append_eos=append_eos,
                           bos_id=None if tok is None else tok.bos_id, eos_id=None if tok is None else tok.eos_id,
                           max_tokens=cfg.n_ctx, query_template=QUERY_TEMPLATE if emb else None,
                           embedding_model=emb)


def format_query(text: str, task: str = DEFAULT_TASK, template: str = QUERY_TEMPLATE) -> str:
    """The text a query is embedded as: ``template`` with the one-sentence ``task`` and the query ``text``."""
    if not isinstance(task, str) or not task.strip():
        raise InputError("instruction must be a non-empty string", field="instruction")
    return template.format(task=task.strip(), text=text)


def prepare_tokens(model, text: str, ecfg: EmbeddingConfig | None = None, *, instruction: str | None = None,
                   max_tokens: int | None = None, truncate: str | None = None) -> list[int]:
    """Token ids to embed for ``text``: the query format when ``instruction`` is given, then ``[BOS] + ids +
    [EOS]`` by the model's rules. Longer than ``max_tokens`` (default: the context length): ContextOverflowError,
    or with ``truncate`` "right" / "left" the text's own tokens are cut (BOS and EOS kept)."""
    ecfg = ecfg or embedding_config(model)
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}", field="text")
    if instruction is not None:
        text = format_query(text, instruction, ecfg.query_template or QUERY_TEMPLATE)
    ids = model.tokenizer.encode(text)
    head = [ecfg.bos_id] if ecfg.add_bos else []
    tail = [ecfg.eos_id] if ecfg.append_eos else []
    limit = min(max_tokens or ecfg.max_tokens, ecfg.max_tokens)
    room = limit - len(head) - len(tail)
    if len(ids) > room:
        if truncate not in ("left", "right"):
            raise ContextOverflowError(f"text has {len(ids) + len(head) + len(tail)} tokens, more than the limit "
                                       f"{limit}")
        ids = ids[:room] if truncate == "right" else ids[len(ids) - room:]
    return head + ids + tail


# ---- the embedder ----------------------------------------------------------------------------------------

class _Text:
    """One text in flight: its ids, how many rows are done, its KV slot and its pooling accumulator."""
    __slots__ = ("index", "ids", "done", "slot", "acc")

    def __init__(self, index, ids):
        self.index, self.ids, self.done, self.slot, self.acc = index, ids, 0, -1, None


class Embedder:
    """Pooled embeddings of token sequences, many per prefill step (a qwen3 / gemma3 BitNet embedding model, or a
    generative BitNet model's final normed hidden states).

    ``max_rows``: rows (tokens) per step (larger: each weight matrix read for more rows, more activation memory);
    ``max_texts``: texts in one step (KV slots); ``max_seq_len``: longest text (0: the model's context length,
    capped at 8192 to bound the KV pool; longer texts need it set); ``kv_dtype``: "f32" / "f16"; ``threads``:
    Numba threads (0: as set); ``prefault_kv``: write the KV pool once now (a benchmark's pool sized to the job),
    not in the first steps. Memory: the KV pool holds ``max_rows + max_seq_len`` tokens (plus a block per text),
    allocated lazily. Larger steps also cost fewer thread-pool wake-ups per token (every kernel is a parallel region):
    on a busy 2-core machine 2048-row steps made the norms and quantizers ~3x cheaper than 512-row steps.
    """

    def __init__(self, model, *, max_rows: int = 512, max_texts: int = 64, max_seq_len: int = 0,
                 kv_dtype: str = "f32", threads: int = 0, block_size: int = 16, prefault_kv: bool = False):
        for name, v in (("max_rows", max_rows), ("max_texts", max_texts), ("block_size", block_size)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(max_seq_len, int) or max_seq_len < 0:
            raise ConfigError(f"max_seq_len must be an integer >= 0, got {max_seq_len!r}")
        check_kv_dtype(kv_dtype)
        if threads:
            numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
        cfg = model.config
        self.model = model
        self.embedding_model = bool(getattr(model, "embedding_only", False))
        self.max_rows, self.max_texts = max_rows, max_texts
        self.max_seq_len = min(max_seq_len or min(cfg.n_ctx, 8192), cfg.n_ctx)
        n_tokens = max_rows + self.max_seq_len + block_size * (max_texts + 1)
        self.kv = KVCache(n_layer=cfg.n_layer, n_kv_heads=cfg.n_head_kv, head_dim=cfg.head_dim, max_seqs=max_texts,
                          max_seq_len=self.max_seq_len, n_tokens=n_tokens, block_size=block_size, dtype=kv_dtype)
        if prefault_kv:                   # first writes to fresh pages cost ~13 us per 4 KiB in a VM (see Engine)
            self.kv.prefault()
        if self.embedding_model:
            self.ws = EmbeddingWorkspace(cfg, max_rows, self.max_seq_len)
            self.rope = RopeTables(cfg, self.max_seq_len)
        else:
            from .engine.workspace import Workspace

            self.ws = Workspace(cfg, max_rows, 1, self.max_seq_len)
            self.rope = RopeTable(cfg, self.max_seq_len)
            self._rows = np.zeros((max_rows, cfg.n_embd), np.float64)
        self.steps = 0
        self.rows = 0
        self.busy_s = 0.0

    @property
    def dim(self) -> int:
        return self.model.config.n_embd

    def embed(self, token_lists, *, pooling: str = "last", normalize: bool = True,
              dimensions: int | None = None) -> np.ndarray:
        """float32 [n, dimensions or dim]: one pooled (and, with ``normalize``, L2-normalised) vector per token
        list, in input order. Raises ContextOverflowError / ValueError naming the first bad list."""
        pooled = self.pooled(token_lists, pooling)
        return finish(pooled, normalize=normalize, dimensions=dimensions)

    def pooled(self, token_lists, pooling: str = "last") -> np.ndarray:
        """float64 [n, dim]: the pooled final hidden states, before normalisation."""
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        texts = [_Text(i, self._checked(i, ids)) for i, ids in enumerate(token_lists)]
        out = np.zeros((len(texts), self.dim), np.float64)
        queue = deque(texts)
        while queue:
            parts = self._next_step(queue)
            self._run(parts, pooling, out)
        return out

    def _checked(self, i, ids) -> np.ndarray:
        a = np.asarray(ids)
        if a.ndim != 1 or a.size == 0 or a.dtype.kind not in "iu":
            raise ValueError(f"token list {i} must be a non-empty 1-D sequence of integer ids")
        if a.size > self.max_seq_len:
            raise ContextOverflowError(f"token list {i} has {a.size} tokens, more than this embedder's "
                                       f"max_seq_len {self.max_seq_len}")
        n_vocab = self.model.config.n_vocab
        if a.min() < 0 or a.max() >= n_vocab:
            raise ValueError(f"token list {i}: ids must be in [0, {n_vocab})")
        return a.astype(np.int32)

    def _next_step(self, queue: deque) -> list:
        """Take the next step's parts from the front of ``queue``: (text, first row, rows). A text cut by the row
        budget stays at the front and goes on in the next step; new texts get a KV slot here."""
        parts, rows = [], 0
        for text in list(queue):
            if rows == self.max_rows or len(parts) == self.max_texts:
                break
            if text.slot < 0:
                if not self.kv.free_slots:
                    break
                text.slot = self.kv.allocate()
            m = min(len(text.ids) - text.done, self.max_rows - rows)
            parts.append((text, text.done, m))
            rows += m
            if text.done + m < len(text.ids):
                break                         # cut: continues first in the next step
        for text, start, m in parts:
            if start + m == len(text.ids):
                queue.popleft()               # finished texts are exactly the leading ones
        return parts

    def step(self, parts, want_rows) -> np.ndarray:
        """One prefill step over ``parts`` ((KV slot, token ids, first position) each; the slots' blocks are
        reserved here): the final normed hidden states of the step's rows ``want_rows`` (indices into the step's
        rows, in order), float64 [len(want_rows), n_embd]."""
        T = sum(len(toks) for _, toks, _ in parts)
        tokens = np.empty(T, np.int32)
        row_seq = np.empty(T, np.int32)
        row_pos = np.empty(T, np.int32)
        r = 0
        for slot, toks, start in parts:
            m = len(toks)
            self.kv.reserve(slot, start + m)
            tokens[r:r + m] = toks
            row_seq[r:r + m] = slot
            row_pos[r:r + m] = np.arange(start, start + m, dtype=np.int32)
            r += m
        if not len(want_rows):                # the rows' K/V are still computed
            want_rows = [T - 1]
        batch = StepBatch(tokens, row_seq, row_pos, np.asarray(want_rows, np.int32))
        t0 = time.perf_counter()
        if self.embedding_model:
            hidden = embedding_hidden(self.model.weights, self.model.config, self.ws, self.kv, self.rope, batch)
        else:
            hidden = bitnet_hidden(self.model.weights, self.model.config, self.ws, self.kv, self.rope, batch,
                                   self._rows)
        self.busy_s += time.perf_counter() - t0
        self.steps += 1
        self.rows += T
        return hidden

    def _run(self, parts, pooling: str, out: np.ndarray) -> None:
        wanted, r = [], 0
        for text, start, m in parts:
            if pooling == "mean":
                wanted.extend(range(r, r + m))
            elif pooling == "last" and start + m == len(text.ids):
                wanted.append(r + m - 1)
            elif pooling == "cls" and start == 0:
                wanted.append(r)
            r += m
        hidden = self.step([(text.slot, text.ids[start:start + m], start) for text, start, m in parts], wanted)
        self._pool(parts, pooling, hidden, out)
        for text, start, m in parts:
            text.done = start + m
            if text.done == len(text.ids):
                self.kv.free(text.slot)
                text.slot = -1

    @staticmethod
    def _pool(parts, pooling: str, hidden: np.ndarray, out: np.ndarray) -> None:
        """Fold the step's wanted rows into each text's result (``hidden`` rows in the order they were asked)."""
        j = 0
        for text, start, m in parts:
            end = start + m == len(text.ids)
            if pooling == "mean":
                text.acc = accumulate_rows(text.acc, hidden[j:j + m])
                j += m
                if end:
                    out[text.index] = text.acc / len(text.ids)
            elif (pooling == "last" and end) or (pooling == "cls" and start == 0):
                out[text.index] = hidden[j]
                j += 1


def accumulate_rows(acc: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """``acc`` (None: zeros) plus the rows [m, D], added strictly in order, ((acc + r0) + r1) + ...
    (``np.add.accumulate``), so a text's sum is the same however its rows were cut into steps."""
    acc = np.zeros(rows.shape[1]) if acc is None else acc
    return np.add.accumulate(np.vstack([acc[None, :], rows]), axis=0)[-1]


def finish(pooled: np.ndarray, *, normalize: bool = True, dimensions: int | None = None) -> np.ndarray:
    """Pooled vectors (float [n, D]) -> float32 [n, dimensions or D]: truncated to the first ``dimensions``
    components (Matryoshka), then L2-normalised (in float64) when ``normalize``. A zero vector stays zero."""
    v = np.asarray(pooled, np.float64)
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, (int, np.integer)) \
                or not 1 <= dimensions <= v.shape[1]:
            raise ConfigError(f"dimensions must be an integer in [1, {v.shape[1]}], got {dimensions!r}")
        v = v[:, :int(dimensions)]
    if normalize:
        norm = np.sqrt(np.einsum("ij,ij->i", v, v))
        v = v / np.where(norm > 0, norm, 1.0)[:, None]
    return v.astype(np.float32)


# ---- output quantizers -----------------------------------------------------------------------------------

def quantize_float16(v: np.ndarray) -> np.ndarray:
    """float16 [n, d] (round to nearest even; values beyond +-65504 become +-inf, which normalised vectors never
    reach)."""
    return np.asarray(v, np.float32).astype(np.float16)


def quantize_int8(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-vector symmetric int8: (q int8 [n, d], scale float32 [n]) with q = rint(v / scale) and scale =
    max|v| / 127 (rounding half to even; an all-zero vector gets scale 0 and zeros). ``q * scale`` approximates v;
    cosine similarity can be taken on q directly (the scale is positive)."""
    v = np.asarray(v, np.float32)
    amax = np.abs(v).max(axis=1) if v.shape[1] else np.zeros(v.shape[0], np.float32)
    scale = (amax / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(v / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


def quantize_binary(v: np.ndarray) -> np.ndarray:
    """Sign bits packed 8 per byte, first component in the most significant bit (``np.packbits``, as
    sentence-transformers' "ubinary"): uint8 [n, ceil(d / 8)], bit = 1 where the component is > 0; a last partial
    byte is padded with zero bits. Hamming distance between the packed rows ranks like cosine on sign vectors."""
    return np.packbits(np.asarray(v) > 0, axis=1)
