"""``Model``: a loaded BitNet model (config, weights in kernel layout, tokenizer) and ``load_model``.

A model comes from a GGUF file or from a Hugging Face checkpoint directory (``hf.py``); both give the same
``Model`` and everything after loading (engine, jobs, Ray workers) is the same."""
from __future__ import annotations

import ctypes
import hashlib
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, ContextOverflowError, ModelFormatError, TokenizerError
from . import hf
from .embedding_models import EmbeddingModelConfig, is_embedding_arch, load_embedding_weights
from .gguf import GGUFFile, release_array_pages
from .hf import Checkpoint
from .hub import resolve_model_path
from .weights import Weights, load_weights


class Int8Table(NamedTuple):
    """The lm_head table as the argmax lm_head's int8 screen reads it (``jit_kernels.lm_head_int8``)."""
    codes: np.ndarray       # uint8 [V, D padded to 64]: q + 128
    scale: np.ndarray       # float64 [V]: s, the row's quantization step
    enorm: np.ndarray       # float64 [V]: >= ||w - s q||
    wnorm: np.ndarray       # float64 [V]: >= ||w||


class Model:
    """A BitNet b1.58 model ready to run. Use :func:`load_model` to make one."""

    def __init__(self, path: Path, gguf: GGUFFile | None, config: ModelConfig, weights: Weights, tokenizer,
                 load_s: float, *, checkpoint: Checkpoint | None = None):
        self.path = path                # the GGUF file, or the checkpoint directory
        self.gguf = gguf                # None for a Hugging Face checkpoint
        self.checkpoint = checkpoint    # None for a GGUF
        self.config = config
        self.weights = weights
        self._tokenizer = tokenizer
        self.load_s = load_s
        self._sha256 = None
        self._engine = None
        self._bf16_lm_head = None
        self._bf16_row_norms = None
        self._int8_lm_head = None

    @property
    def tokenizer(self):
        """The tokenizer built from the GGUF metadata (raises TokenizerError if the file has none)."""
        if self._tokenizer is None:
            raise TokenizerError(f"{self.path}: the model has no usable tokenizer metadata")
        return self._tokenizer

    @property
    def metadata(self) -> dict:
        """The GGUF metadata, less ``tokenizer.ggml.merges`` and ``tokenizer.ggml.tokens`` once the tokenizer is built
        (it holds them; ``tokenizer.token_bytes`` / ``token_text`` give a token). For a Hugging Face checkpoint: the
        GGUF metadata ``convert`` would write, tokenizer arrays left out."""
        if self.gguf is None:
            from ..convert import model_metadata

            return model_metadata(self.config, self.checkpoint)
        return self.gguf.metadata

    @property
    def embedding_only(self) -> bool:
        """True for the embedding architectures (``embedding_models``): hidden states only, no lm_head."""
        return bool(getattr(self.config, "embedding_only", False))

    def sha256(self) -> str:
        """sha256 of the model file (computed once, streamed). For a checkpoint directory: of its files (config,
        index, safetensors shards, tokenizer files) in name order, each as its name, a NUL byte and its bytes."""
        if self._sha256 is None:
            ckpt = self.checkpoint
            self._sha256 = files_sha256([self.path] if ckpt is None else ckpt.files, named=ckpt is not None)
        return self._sha256

    def bf16_lm_head(self) -> np.ndarray:
        """The lm_head table rounded to bfloat16 (uint16 [V, D padded to 32], ``jit_kernels.lm_head_bf16``), built
        once per model for the engines with ``lm_head_dtype="bf16"`` and the argmax lm_head's bf16 screen."""
        if self._bf16_lm_head is None:
            from jit_kernels import lm_head_bf16
            from jit_kernels.buffers import aligned_empty

            V, D = self.weights.output.shape
            table = aligned_empty((V, lm_head_bf16.padded_dim(D)), np.uint16)
            self._copy_table(lambda part, lo: lm_head_bf16.bf16_table(part, self.weights.output_kind,
                                                                      table[lo:lo + len(part)]))
            self._bf16_lm_head = table
        return self._bf16_lm_head

    def int8_lm_head(self) -> "Int8Table":
        """The lm_head table quantized to int8 per row with its bounds (``jit_kernels.lm_head_int8.int8_table``),
        built once per model for the argmax lm_head's int8 screen."""
        if self._int8_lm_head is None:
            from jit_kernels import lm_head_int8
            from jit_kernels.buffers import aligned_empty

            V, D = self.weights.output.shape
            t = Int8Table(aligned_empty((V, lm_head_int8.padded_dim(D)), np.uint8), *np.empty((3, V)))
            self._copy_table(lambda part, lo: lm_head_int8.int8_table(
                part, self.weights.output_kind, *(a[lo:lo + len(part)] for a in t)))
            self._int8_lm_head = t
        return self._int8_lm_head

    def drop_lm_head_copies(self) -> None:
        """Forget the int8 and bfloat16 copies of the lm_head table (made again on demand): their memory goes back
        to the OS once no engine holds them."""
        self._int8_lm_head = self._bf16_lm_head = self._bf16_row_norms = None
        release_free_heap()

    def _copy_table(self, convert) -> None:
        """convert(part, first_row) over the lm_head table in slices of 64 MB. The file's table leaves this
        process's resident pages as the copy is made (a tied table's rows fault back in as the embedding lookup
        reads them), so the two never count twice."""
        w = self.weights
        V, D = w.output.shape
        rows = max(1, (64 << 20) // (D * w.output.itemsize))
        for lo in range(0, V, rows):
            part = w.output[lo:lo + rows]
            convert(part, lo)
            release_array_pages(part)           # a no-op for a table in memory (dequantized, converted)

    def bf16_row_norms(self) -> np.ndarray:
        """Upper bounds of the lm_head table's row norms (float64 [V], ``lm_head_bf16.row_norm_bounds``), from
        ``bf16_lm_head``; built once per model for the argmax lm_head (``argmax_head``)."""
        if self._bf16_row_norms is None:
            from jit_kernels import lm_head_bf16

            table = self.bf16_lm_head()
            norms = np.empty(table.shape[0], np.float64)
            lm_head_bf16.row_norm_bounds(table, norms)
            self._bf16_row_norms = norms
        return self._bf16_row_norms

    def logits(self, token_ids) -> np.ndarray:
        """Logits at every position of one sequence, computed with a fresh KV cache (prefill).

        Returns float32 [len(token_ids), n_vocab]."""
        from ..engine.engine import Engine, EngineConfig

        if self.embedding_only:
            raise ConfigError(f"{self.path}: {self.config.arch} is an embedding model (no lm_head, no logits); "
                              "use bitnet_batch.embeddings.Embedder")
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        cfg = self.config
        if ids.size == 0:
            return np.zeros((0, cfg.n_vocab), np.float32)
        if ids.size > cfg.n_ctx:
            raise ContextOverflowError(f"{ids.size} tokens exceed the context length {cfg.n_ctx}")
        if ids.min() < 0 or ids.max() >= cfg.n_vocab:
            raise ValueError(f"token ids must be in [0, {cfg.n_vocab}), got min {ids.min()} max {ids.max()}")
        if self._engine is None or self._engine.max_seq_len < ids.size:
            self._engine = Engine(self, EngineConfig(max_batch=1, max_seq_len=max(int(ids.size), 256),
                                                     prefill_chunk=64), logit_rows=64)
        eng = self._engine
        slot = eng.kv.allocate()
        try:
            return eng.all_logits(slot, ids.astype(np.int32))
        finally:
            eng.kv.free(slot)

    def __repr__(self):
        c = self.config
        return (f"Model({self.path.name}: {c.arch}, {c.n_layer} layers, d={c.n_embd}, heads {c.n_head}/"
                f"{c.n_head_kv}, ffn {c.n_ff} {c.ffn_act}, vocab {c.n_vocab})")


def files_sha256(files, *, named: bool) -> str:
    """sha256 over files in order (each preceded by its name and a NUL byte when ``named``), streamed."""
    h = hashlib.sha256()
    for path in files:
        if named:
            h.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def release_free_heap() -> None:
    """Give freed C heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_model(path_or_repo_id, *, filename: str | None = None, ffn_act: str | None = None,
               revision: str | None = None) -> Model:
    """Load a BitNet model from a GGUF file, a Hugging Face checkpoint directory, or a Hugging Face repo id (a GGUF
    repo with ``filename``, else a checkpoint repo; cached; honours HF_HUB_OFFLINE).

    ``ffn_act`` ("relu2" / "silu") overrides the FFN activation the model implies."""
    from ..tokenizer import tokenizer_from_metadata

    t0 = time.perf_counter()
    path = resolve_model_path(path_or_repo_id, filename, revision)
    if path.is_dir():
        return _load_checkpoint(path, ffn_act, t0)
    gf = GGUFFile(path)
    md = gf.metadata
    emb = gf.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise ModelFormatError(path, "required 2-D tensor is missing or malformed", tensor="token_embd.weight")
    n_vocab = int(emb.shape[1])
    if is_embedding_arch(md):                      # qwen3 / gemma3 BitNet embedding models
        if ffn_act is not None:
            raise ConfigError(f"{path}: ffn_act cannot be overridden for the {md.get('general.architecture')} "
                              "embedding architecture")
        cfg = EmbeddingModelConfig.from_metadata(md, path, n_vocab_tensor=n_vocab)
        weights = load_embedding_weights(gf, cfg)
    else:
        cfg = ModelConfig.from_metadata(md, path, tied="output.weight" not in gf.tensors, n_vocab_tensor=n_vocab,
                                        ffn_act=ffn_act)
        weights = load_weights(gf, cfg)
    tok = None
    if md.get("tokenizer.ggml.model") is not None:
        tok = tokenizer_from_metadata(md, source=str(path))
        for key in ("tokenizer.ggml.merges", "tokenizer.ggml.tokens"):    # the tokenizer holds them now:
            md.pop(key, None)                                                # 280k + 128k strings for LLaMA-3
        release_free_heap()                        # the tokenizer build's temporaries (~25 MB for LLaMA-3)
    return Model(path, gf, cfg, weights, tok, time.perf_counter() - t0)


def _load_checkpoint(path: Path, ffn_act: str | None, t0: float) -> Model:
    """A Hugging Face checkpoint directory -> Model (see ``hf.py``); the tokenizer from its tokenizer.json."""
    from ..tokenizer import tokenizer_from_hf

    ckpt = Checkpoint(path)
    cfg = hf.model_config(ckpt, ffn_act)
    source = hf.HFSource(ckpt)
    # the tokenizer first: its build temporaries (~120 MB for LLaMA-3) are freed before the weights are resident
    tok = tokenizer_from_hf(path, n_vocab=cfg.n_vocab) if (path / "tokenizer.json").is_file() else None
    release_free_heap()
    weights = load_weights(source, cfg)
    return Model(path, None, cfg, weights, tok, time.perf_counter() - t0, checkpoint=ckpt)
