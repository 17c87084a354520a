"""The `embed` job: one embedding vector per input text, with the BitNet embedding models (Qwen3- and
Gemma3-based) or the pooled hidden states of a generative BitNet model.

Input records (JSONL / Parquet, the conventions of `run`: ``id`` or ``row-N``, ``file:line`` errors) carry
``text`` and, for queries, an optional ``instruction`` (a one-sentence task: the text is then embedded in the
model's query format, ``embeddings.prepare_tokens``). Texts are packed many per prefill step by the job loop
(rows of several texts share a step, without padding, so sorting by length would buy nothing); a text's KV
blocks are freed as soon as its last rows ran, and nothing is decoded.

Output record, one per input item::

    {"id", "index", "text": null, "finish_reason": "embedded" | "error",
     "usage": {"prompt_tokens": tokens embedded, "completion_tokens": 0, "cached_tokens": 0},
     "timing": {...: prefill_s is the whole time since admission}, "error": null | {...},
     "embedding": [d numbers] (float32 / float16 values, int8 values, or the packed sign bytes for binary),
     "scale": only for int8: the float32 to multiply the int8 values by}

In Parquet, ``embedding`` is a ``fixed_size_list`` column of float32 / float16 / int8 / uint8 (binary: the
ceil(d / 8) packed bytes) and ``scale`` a float32 column. A vector does not depend on the batch it ran in, the
step size or the order of the texts (bit-identical).
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import EngineConfig
from ..embeddings import (POOLINGS, Embedder, accumulate_rows, embedding_config, finish, prepare_tokens,
                          quantize_binary, quantize_float16, quantize_int8)
from ..engine.engine import part_outputs, wanted_rows
from ..engine.warmup import kernel_cache_cold
from ..errors import ConfigError, ContextOverflowError, InputError
from ..io import readers
from ..records import error_record, timing
from ..scheduler import Part, Scheduler, Sequence
from .common import JobBase, errors_in_output, peak_rss_mb, summary_head, summary_times
from .loop import ItemStats, JobKind, run_local

DTYPES = ("float32", "float16", "int8", "binary")
TRUNCATE_MODES = (None, "left", "right")


@dataclass(frozen=True)
class EmbedItem:
    index: int
    id: str | int
    text: str
    instruction: str | None
    location: str


@dataclass(frozen=True)
class EmbedFields:
    """Input column names."""
    text: str = "text"
    instruction: str = "instruction"
    id: str = "id"

    def __post_init__(self):
        names = asdict(self)
        if not all(isinstance(v, str) and v for v in names.values()) or len(set(names.values())) != len(names):
            raise ConfigError(f"text, instruction and id field names must be distinct non-empty strings, got {names}")


def read_embed_items(paths, *, fields: EmbedFields = EmbedFields(), fmt: str | None = None):
    """Every record of ``paths`` as EmbedItem or BadRecord (``io.readers`` conventions)."""
    return readers.read_items(paths, embed_spec(fields), fmt=fmt)


def embed_spec(fields: EmbedFields = EmbedFields()) -> readers.RecordSpec:
    """Records -> ``EmbedItem`` (``text`` and an optional ``instruction``)."""
    def parse(record: dict, index: int, record_id, location: str) -> EmbedItem:
        text = record.get(fields.text)
        if not isinstance(text, str) or not text:
            what = "missing" if fields.text not in record else f"a {readers.type_name(text)}"
            hint = readers.other_fields(record, "--text-field", fields.id) if fields.text not in record else ""
            raise InputError(f"field {fields.text!r} must be a non-empty string, got {what}{hint}",
                             field=fields.text)
        instruction = record.get(fields.instruction)
        if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
            raise InputError(f"field {fields.instruction!r} must be a non-empty string (a one-sentence task)",
                             field=fields.instruction)
        return EmbedItem(index, record_id, text, instruction, location)

    return readers.RecordSpec(parse, id_field=fields.id)


@dataclass(frozen=True)
class EmbedJobConfig(JobBase):
    """One `bitnet-batch embed` job (output_format: "jsonl" or "parquet")."""
    fields: EmbedFields = field(default_factory=EmbedFields)
    pooling: str | None = None              # "last" | "mean" | "cls"; None: the model's (GGUF pooling_type)
    normalize: bool = True                  # L2-normalise (after the Matryoshka cut)
    dimensions: int | None = None           # keep the first N components (Matryoshka), then normalise
    dtype: str = "float32"                  # "float32" | "float16" | "int8" | "binary"
    truncate: str | None = None             # over-long texts: None -> error record; "left" / "right" cut them

    def __post_init__(self):
        super().__post_init__()
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.truncate not in TRUNCATE_MODES:
            raise ConfigError(f"truncate must be one of left, right, got {self.truncate!r}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise ConfigError(f"dimensions must be an integer >= 1, got {self.dimensions!r}")
        if self.output_format not in (None, "jsonl", "parquet"):
            raise ConfigError(f"embed output_format must be jsonl or parquet, got {self.output_format!r}")

    def fingerprint(self, model_sha256: str) -> dict:
        fp = {"task": "embed", "model_sha256": model_sha256, "fields": asdict(self.fields), "pooling": self.pooling,
              "normalize": self.normalize, "dimensions": self.dimensions, "dtype": self.dtype,
              "truncate": self.truncate, "ffn_act": self.ffn_act, "inputs": [Path(p).name for p in self.inputs]}
        if self.engine.kv_dtype != "f32":
            fp["kv_dtype"] = self.engine.kv_dtype
        return fp

    def parquet_columns(self, model) -> dict:
        import pyarrow as pa

        dim = self.dimensions or model.config.n_embd
        if self.dtype == "binary":
            return {"embedding": pa.list_(pa.uint8(), -(-dim // 8))}
        columns = {"embedding": pa.list_({"float32": pa.float32(), "float16": pa.float16(),
                                          "int8": pa.int8()}[self.dtype], dim)}
        if self.dtype == "int8":
            columns["scale"] = pa.float32()
        return columns


class EmbedEngine:
    """An ``Embedder`` behind the interface the job loop drives (``kv``, ``config``, ``max_rows``, ``step``): a
    step's part wants its final normed hidden rows ("all"), its last row's (True) or none (False)."""

    def __init__(self, model, config: EngineConfig):
        self.model, self.config = model, config
        self.max_rows = max(config.prefill_chunk, config.max_batch)
        self.embedder = Embedder(model, max_rows=self.max_rows, max_texts=config.max_batch,
                                 max_seq_len=config.max_seq_len, kv_dtype=config.kv_dtype, threads=config.threads,
                                 block_size=config.block_size, prefault_kv=config.prefault_kv)
        self.kv = self.embedder.kv

    def step(self, parts) -> list:
        wanted, spans, r = [], [], 0
        for _, toks, _, want in parts:
            spans.append(wanted_rows(want, r, len(toks), wanted))
            r += len(toks)
        hidden = self.embedder.step([(slot, toks, start) for slot, toks, start, _ in parts], wanted)
        return part_outputs(hidden, spans)


@dataclass
class _EmbedState:
    item: EmbedItem
    acc: np.ndarray | None = None           # float64 [n_embd]: the pooled rows so far


@dataclass
class EmbedStats(ItemStats):
    tokens: int = 0             # tokens embedded (this run's records)
    engine_s: float = 0.0
    steps: int = 0

    def tally(self, record: dict) -> None:
        self.tokens += record["usage"]["prompt_tokens"]


class EmbedKind(JobKind):
    """Embedding: each text is one prefill-only sequence; the rows its pooling needs are folded in as they come
    and the vector is written when its last chunk ran."""

    stats_class = EmbedStats
    config_class = EmbedJobConfig

    def __init__(self, job: EmbedJobConfig, model, engine: EmbedEngine, sink):
        super().__init__(job, model, engine, sink)
        self.ecfg = embedding_config(model)
        self.pooling = job.pooling or self.ecfg.pooling
        if job.dimensions is not None and job.dimensions > self.ecfg.dim:
            raise ConfigError(f"dimensions must be at most the model's {self.ecfg.dim}, got {job.dimensions}")
        self._keys = 0

    @staticmethod
    def engine_for(model, config: EngineConfig) -> EmbedEngine:
        return EmbedEngine(model, config)

    @staticmethod
    def kernels_cold(engine: EmbedEngine) -> bool:
        from jit_kernels.attention import _attention     # the embedding models' attention

        return kernel_cache_cold(_attention if engine.embedder.embedding_model else None)

    @staticmethod
    def warm_up(engine: EmbedEngine) -> float:
        """Compile the embedding forward for small and large steps."""
        from jit_kernels._config import parallel_drivers

        t0 = time.perf_counter()
        slot = engine.kv.allocate()
        try:
            engine.step([(slot, np.array([0, 1], np.int32), 0, "all")])
            with parallel_drivers():
                engine.step([(slot, np.array([2, 3], np.int32), 2, True)])
        finally:
            engine.kv.free(slot)
        return time.perf_counter() - t0

    @classmethod
    def record_spec(cls, job: EmbedJobConfig) -> readers.RecordSpec:
        return embed_spec(job.fields)

    def start(self, item) -> list[Sequence]:
        if self.settled(item):
            return []
        try:
            ids = prepare_tokens(self.model, item.text, self.ecfg, instruction=item.instruction,
                                 max_tokens=self.engine.embedder.max_seq_len, truncate=self.job.truncate)
        except ContextOverflowError as e:
            self.emit.write(error_record(item.index, item.id, ContextOverflowError(
                f"{item.location}: {e}; use --truncate left|right to cut it")))
            return []
        except InputError as e:
            name = self.job.fields.instruction if e.field == "instruction" else self.job.fields.text
            self.emit.write(error_record(item.index, item.id, InputError(str(e), location=item.location, field=name)))
            return []
        self._keys += 1
        return [Sequence(key=self._keys, prompt=np.asarray(ids, np.int32), max_new=0, state=_EmbedState(item),
                         cache_limit=0)]

    def want(self, part: Part):
        if self.pooling == "mean":
            return "all"
        if self.pooling == "cls":
            return "all" if part.start == 0 else False
        return part.want_logits                 # last: the part that ends the text

    def advance(self, sched: Scheduler, parts: list[Part], outs: list, t0: float, t1: float) -> None:
        self.stats.engine_s += t1 - t0
        self.stats.steps += 1
        for p, rows in zip(parts, outs):
            st: _EmbedState = p.seq.state
            if rows is not None:
                if self.pooling == "mean":
                    st.acc = accumulate_rows(st.acc, rows)
                elif self.pooling == "cls":
                    st.acc = np.array(rows[0])
                else:
                    st.acc = np.array(rows)                 # a view of the step's buffer: copied
            if not p.seq.prefilling:
                sched.retire(p.seq)
                self.emit.write(self._record(p.seq, time.perf_counter()))

    def _record(self, seq: Sequence, now: float) -> dict:
        st: _EmbedState = seq.state
        n = len(seq.prompt)
        pooled = st.acc / n if self.pooling == "mean" else st.acc
        vec = finish(pooled[None, :], normalize=self.job.normalize, dimensions=self.job.dimensions)
        rec = {"id": st.item.id, "index": st.item.index, "text": None, "finish_reason": "embedded",
               "usage": {"prompt_tokens": n, "completion_tokens": 0, "cached_tokens": 0},
               "timing": timing(seq.t_enqueue, seq.t_admit, now, now, n), "error": None}
        if self.job.dtype == "float32":
            rec["embedding"] = vec[0].tolist()
        elif self.job.dtype == "float16":
            rec["embedding"] = quantize_float16(vec)[0].tolist()
        elif self.job.dtype == "int8":
            q, scale = quantize_int8(vec)
            rec["embedding"], rec["scale"] = q[0].tolist(), float(scale[0])
        else:
            rec["embedding"] = quantize_binary(vec)[0].tolist()
        return rec

    def facts(self) -> dict:
        return {"pooling": self.pooling, "dimensions": self.job.dimensions or self.ecfg.dim}

    @classmethod
    def summary(cls, job: EmbedJobConfig, stats: EmbedStats, ctx: dict) -> dict:
        run_s = ctx["run_s"]
        return {
            "task": "embed", **summary_head(ctx, stats, errors_in_output(ctx)),
            "parameters": {"fields": asdict(job.fields), "pooling": ctx["facts"]["pooling"],
                           "normalize": job.normalize, "dimensions": ctx["facts"]["dimensions"], "dtype": job.dtype,
                           "truncate": job.truncate, "engine": asdict(job.engine)},
            "tokens": stats.tokens,
            "time_s": {**summary_times(ctx), "engine": round(stats.engine_s, 3)},
            "throughput": {"tok_s": round(stats.tokens / stats.engine_s, 2) if stats.engine_s else 0.0,
                           "texts_per_s": round(stats.ok / run_s, 3) if run_s else 0.0},
            "steps": stats.steps,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }

    @classmethod
    def done_line(cls, job: EmbedJobConfig, stats: EmbedStats, summary: dict) -> str:
        s, params = stats, summary["parameters"]
        return (f"done: {s.ok} embedded, {s.errors} errors, {s.skipped} already done | "
                f"{summary['throughput']['tok_s']} tok/s, {summary['throughput']['texts_per_s']} texts/s | "
                f"{params['pooling']} pooling, {params['dimensions']} dims {job.dtype} -> {summary['output']}")


def embed_job(job: EmbedJobConfig, *, model=None, quiet: bool = False, out=sys.stderr) -> dict:
    """Run a whole embed job; returns the summary (also written to ``<output>.meta.json``)."""
    return run_local(job, EmbedKind, model=model, quiet=quiet, out=out)
