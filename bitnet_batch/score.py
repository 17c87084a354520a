"""`bitnet-batch score`: the log-likelihood and perplexity of texts under a model, batched like `run`.

Input records (JSONL / Parquet, same conventions as `run`: ``id`` or ``row-N``, ``file:line`` errors, Parquet
streamed by row group) carry either

* ``text``: every token of it is scored, or
* ``completion`` (and optionally ``prompt``, default ""): only the completion's tokens are scored, each
  conditioned on the prompt and the completion tokens before it.

Which tokens are scored, exactly: the sequence is ``[BOS] + encode(text)`` (BOS only when the tokenizer adds
one, ``tokenizer.ggml.add_bos_token``), or ``[BOS] + encode(prompt) + encode(completion)`` with prompt and
completion encoded separately (so the completion's tokens do not depend on how the prompt ends). Token i
is scored with the logits at position i - 1. Scored: all tokens of ``text`` / ``completion``. Without BOS
a token at position 0 has no context and is not scored (``text`` then scores all tokens but the first).

Output record, one per input item, in input order (``--unordered``: as they finish)::

    {"id", "index", "text": null, "finish_reason": "scored" | "error",
     "usage": {"prompt_tokens": unscored context tokens (BOS + prompt), "completion_tokens": scored tokens},
     "timing": {"queue_s", "prefill_s", "ttft_s", "decode_s": 0, "total_s", "tokens_per_s" (rows / prefill_s)},
     "error": null | {"type", "message"},
     "logprob": sum of log p(token) over scored tokens (natural log), "tokens": scored tokens,
     "mean_nll": -logprob / tokens, "perplexity": exp(mean_nll),
     "logprobs": only with token_logprobs: [{"token", "token_id", "logprob"}] per scored token}

Bad lines, empty texts, nothing to score and texts longer than the context (no truncation: a perplexity
of a cut text would silently mean something else) become error records; resume, the journal and the
ordered final output are `run`'s (``OutputSink``). The job summary (``<output>.meta.json`` and the terminal)
has the corpus perplexity ``exp(-sum(logprob) / sum(tokens))`` over every scored record of the output,
including those an interrupted earlier run wrote.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .engine.engine import Engine, EngineConfig
from .errors import BitnetBatchError, ConfigError, ContextOverflowError, InputError
from .io import readers
from .io.readers import BadRecord, count_records
from .io.writers import OutputSink
from .scheduler import Scheduler, Sequence

FORMATS = ("jsonl", "parquet")
SCORE_KEYS = ("logprob", "tokens", "mean_nll", "perplexity")
_LSE_ROWS = 64              # logit rows converted to float64 at a time (2B4T: 64 x 128256 x 8 B = 66 MB)


# ---------------------------------------------------------------------------------------------- input

@dataclass(frozen=True)
class ScoreItem:
    """One good score input item: ``text``, or ``prompt`` (may be "") + ``completion``."""
    index: int                      # global 0-based input row across all input files
    id: str | int
    text: str | None
    prompt: str | None
    completion: str | None
    location: str                   # "file.jsonl:17" or "file.parquet:row 17"

    def __post_init__(self):
        if (self.text is None) == (self.completion is None):
            raise ValueError(f"{self.location}: a ScoreItem needs exactly one of text and completion")


@dataclass(frozen=True)
class ScoreFields:
    """Input column names."""
    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    id: str = "id"

    def __post_init__(self):
        names = asdict(self)
        for key, name in names.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{key} field name must be a non-empty string, got {name!r}")
        if len(set(names.values())) != len(names):
            raise ConfigError(f"text, prompt, completion and id field names must differ, got {names}")


def read_score_items(paths, *, fields: ScoreFields = ScoreFields(), fmt: str | None = None
                     ) -> Iterator[ScoreItem | BadRecord]:
    """Stream every record of ``paths`` as ScoreItem or BadRecord (``io.readers`` conventions: all files
    are checked before anything is yielded; ids unique across files; stand-in ids for unusable records)."""
    def parse(record: dict, index: int, record_id, location: str) -> ScoreItem:
        text, prompt, completion = _read_texts(record, fields)
        return ScoreItem(index=index, id=record_id, text=text, prompt=prompt, completion=completion,
                         location=location)

    return readers.read_items(paths, readers.RecordSpec(parse, id_field=fields.id), fmt=fmt)


def _read_texts(record: dict, fields: ScoreFields) -> tuple[str | None, str | None, str | None]:
    """-> (text, None, None) or (None, prompt, completion), checked: strings, text / completion non-empty."""
    has_text, has_completion = fields.text in record, fields.completion in record
    if has_text and (has_completion or fields.prompt in record):
        other = fields.completion if has_completion else fields.prompt
        raise InputError(f"record has both field {fields.text!r} and field {other!r}; give {fields.text!r} "
                         f"alone or {fields.prompt!r} + {fields.completion!r}", field=fields.text)
    if not has_text and not has_completion:
        hint = f" ({fields.prompt!r} needs {fields.completion!r})" if fields.prompt in record else ""
        raise InputError(f"missing text: record has neither field {fields.text!r} nor field "
                         f"{fields.completion!r}{hint}", field=fields.text)
    if has_text:
        return _nonempty_str(record, fields.text), None, None
    prompt = record.get(fields.prompt, "")
    if not isinstance(prompt, str):
        raise InputError(f"field {fields.prompt!r} must be a string, got {readers.type_name(prompt)} "
                         f"({readers.short(prompt)})", field=fields.prompt)
    return None, prompt, _nonempty_str(record, fields.completion)


def _nonempty_str(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise InputError(f"field {key!r} must be a string, got {readers.type_name(value)} "
                         f"({readers.short(value)})", field=key)
    if not value:
        raise InputError(f"field {key!r} is empty: there is nothing to score", field=key)
    return value


# ------------------------------------------------------------------------------------------------ job

@dataclass(frozen=True)
class ScoreJobConfig:
    """One `bitnet-batch score` job."""
    inputs: tuple[str, ...]                 # input files (JSONL / Parquet), read in order
    output: str                             # output path (.jsonl / .parquet or output_format)
    model: str                              # GGUF path or Hugging Face repo id
    model_file: str | None = None
    output_format: str | None = None        # "jsonl" | "parquet"
    input_format: str | None = None
    fields: ScoreFields = field(default_factory=ScoreFields)
    token_logprobs: bool = False            # add each scored token's logprob to the record
    ordered: bool = True
    overwrite: bool = False
    ffn_act: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):
        if not self.inputs:
            raise ConfigError("at least one input file is required")
        if not isinstance(self.fields, ScoreFields):
            raise ConfigError(f"fields must be a ScoreFields, got {type(self.fields).__name__}")
        if not isinstance(self.token_logprobs, bool):
            raise ConfigError(f"token_logprobs must be true or false, got {self.token_logprobs!r}")
        if self.output_format is not None and self.output_format not in FORMATS:
            raise ConfigError(f"score output_format must be one of {', '.join(FORMATS)}, got {self.output_format!r}")

    def fingerprint(self, model_sha256: str) -> dict:
        """What determines the records (not batch size or threads)."""
        fp = {"task": "score", "model_sha256": model_sha256, "fields": asdict(self.fields),
              "token_logprobs": self.token_logprobs, "ffn_act": self.ffn_act,
              "inputs": [Path(p).name for p in self.inputs]}
        if self.engine.kv_dtype != "f32":
            fp["kv_dtype"] = self.engine.kv_dtype
        return fp


@dataclass
class _ScoreState:
    """What a Sequence carries through the scheduler: where scoring starts and the sums so far."""
    item: ScoreItem
    first: int                              # position of the first scored token = unscored tokens before it
    logprobs: list = field(default_factory=list)     # float log p of each scored token so far, in order


@dataclass
class ScoreStats:
    items: int = 0
    ok: int = 0
    errors: int = 0
    skipped: int = 0
    rows: int = 0               # tokens run through the model
    cached: int = 0             # tokens served from the prefix cache instead (this run)
    scored: int = 0             # tokens scored (this run)
    logprob: float = 0.0        # sum over this run's scored records
    engine_s: float = 0.0
    steps: int = 0


class Scorer:
    """Turns items into sequences, runs them in batched prefill steps and writes one record per item."""

    def __init__(self, job: ScoreJobConfig, model, *, progress=None):
        self.job = job
        self.model = model
        self.tok = model.tokenizer
        self.stats = ScoreStats()
        self.progress = progress
        self._keys = 0

    def tokens(self, item: ScoreItem) -> tuple[list[int], int]:
        """(token ids of the whole sequence, position of the first scored token); see the module doc."""
        tok = self.tok
        bos = [tok.bos_id] if tok.add_bos else []
        f = self.job.fields
        try:
            if item.text is not None:
                ids = bos + tok.encode(item.text)
                return ids, 1
            context = bos + tok.encode(item.prompt)
            ids = context + tok.encode(item.completion)
        except InputError as e:
            field_name = f.text if item.text is not None else f.completion
            raise InputError(str(e), location=item.location, field=field_name) from None
        return ids, max(1, len(context))

    def plan(self, item: ScoreItem) -> Sequence:
        ids, first = self.tokens(item)
        if first >= len(ids):
            f = self.job.fields
            raise InputError(f"{item.location}: nothing to score: a single token with no BOS or prompt before it",
                             field=f.text if item.text is not None else f.completion)
        limit = self.engine.max_seq_len
        if len(ids) > limit:
            raise ContextOverflowError(f"{item.location}: {len(ids)} tokens (with BOS and prompt) exceed the "
                                       f"context of {limit}; split the text into shorter records")
        self._keys += 1
        # the row before the first scored token predicts it: it is computed, never served from the prefix cache
        return Sequence(key=self._keys, prompt=np.asarray(ids, np.int32), max_new=0, state=_ScoreState(item, first),
                        cache_limit=first - 1)

    # ---------------------------------------------------------------- the loop
    def run(self, sink: OutputSink, engine: Engine, stop=None) -> ScoreStats:
        """Score every item of the input; returns early, after a whole step, once ``stop`` is requested."""
        self.engine, self.sink = engine, sink
        sched = Scheduler(engine.kv, engine.config.max_batch, engine.max_rows)
        reader = read_score_items(list(self.job.inputs), fields=self.job.fields, fmt=self.job.input_format)
        exhausted, lookahead = False, 2 * engine.config.max_batch + 2
        while stop is None or not stop.requested:
            while not exhausted and len(sched.waiting) < lookahead:
                item = next(reader, None)
                if item is None:
                    exhausted = True
                    break
                self.stats.items += 1
                seq = self._start(item)
                if seq is not None:
                    sched.add(seq)
            sched.admit()
            parts = sched.plan()
            if not parts:
                if exhausted and not sched.waiting and not sched.running:
                    break
                continue
            self._step(sched, parts)
        return self.stats

    def _start(self, item) -> Sequence | None:
        if item.id in self.sink.done:
            self.stats.skipped += 1
            self._tick()
            return None
        if isinstance(item, BadRecord):
            self._emit(error_record(item.index, item.id, item.error))
            return None
        try:
            return self.plan(item)
        except BitnetBatchError as e:
            self._emit(error_record(item.index, item.id, e))
            return None

    def _step(self, sched: Scheduler, parts) -> None:
        """One engine step over the planned prefill chunks; logits only for chunks that score something."""
        wants = ["all" if p.start + len(p.tokens) >= p.seq.state.first else False for p in parts]
        t0 = time.perf_counter()
        outs = self.engine.step([(p.seq.slot, p.tokens, p.start, w) for p, w in zip(parts, wants)])
        t1 = time.perf_counter()
        sched.commit(parts)
        self.stats.engine_s += t1 - t0
        self.stats.steps += 1
        self.stats.rows += sum(len(p.tokens) for p in parts)
        for p, logits in zip(parts, outs):
            if logits is not None:
                self._accumulate(p.seq, p.start, logits)
            if not p.seq.prefilling:
                sched.retire(p.seq)
                self._emit(self._record(p.seq, time.perf_counter()))

    def _accumulate(self, seq: Sequence, start: int, logits: np.ndarray) -> None:
        """Add the log-probabilities of the tokens that rows ``start..start+m-1`` predict (row at position p
        predicts token p + 1), for scored tokens only. float64 log-softmax over the whole vocabulary, row by
        row, so a token's value does not depend on which rows shared its step."""
        st: _ScoreState = seq.state
        ids = seq.prompt
        m = logits.shape[0]
        lo = max(start, st.first - 1)                       # first row whose prediction is scored
        hi = min(start + m, len(ids) - 1)                   # rows past the last token predict nothing
        for r0 in range(lo, hi, _LSE_ROWS):
            r1 = min(hi, r0 + _LSE_ROWS)
            x = logits[r0 - start:r1 - start].astype(np.float64)          # [rows, n_vocab]
            mx = x.max(axis=1)
            lse = mx + np.log(np.exp(x - mx[:, None]).sum(axis=1))
            target = ids[r0 + 1:r1 + 1]
            st.logprobs += (x[np.arange(r1 - r0), target] - lse).tolist()

    def _record(self, seq: Sequence, now: float) -> dict:
        st: _ScoreState = seq.state
        n = len(seq.prompt) - st.first
        busy = now - seq.t_admit
        rec = {"id": st.item.id, "index": st.item.index, "text": None, "finish_reason": "scored",
               "usage": {"prompt_tokens": st.first, "completion_tokens": n, "cached_tokens": seq.n_cached},
               "timing": {"queue_s": round(seq.t_admit - seq.t_enqueue, 6), "prefill_s": round(busy, 6),
                          "ttft_s": round(now - seq.t_enqueue, 6), "decode_s": 0.0,
                          "total_s": round(now - seq.t_enqueue, 6),
                          "tokens_per_s": round(len(seq.prompt) / busy, 3) if busy > 0 else 0.0},
               "error": None, **score_fields(math.fsum(st.logprobs), n)}     # fsum: exact, order-free
        if self.job.token_logprobs:
            ids = seq.prompt[st.first:].tolist()
            rec["logprobs"] = [{"token": self.tok.decode([t]), "token_id": t, "logprob": v}
                               for t, v in zip(ids, st.logprobs)]
        return rec

    def _emit(self, record: dict) -> None:
        self.sink.write(record)
        if record["finish_reason"] == "error":
            self.stats.errors += 1
        else:
            self.stats.ok += 1
            self.stats.cached += record["usage"]["cached_tokens"]
            self.stats.scored += record["tokens"]
            self.stats.logprob += record["logprob"]
        self._tick()

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress.update(1)


def score_fields(logprob: float, n: int) -> dict:
    """The score keys of a record from the summed log-probability of n scored tokens."""
    mean_nll = -logprob / n
    return {"logprob": logprob, "tokens": n, "mean_nll": mean_nll, "perplexity": math.exp(mean_nll)}


def error_record(index: int, rid, err: Exception) -> dict:
    return {"id": rid, "index": index, "text": None, "finish_reason": "error",
            "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "timing": {k: 0.0 for k in ("queue_s", "prefill_s", "ttft_s", "decode_s", "total_s", "tokens_per_s")},
            "error": {"type": type(err).__name__, "message": str(err)}}


def output_totals(path: Path, fmt: str) -> dict:
    """Records, errors, scored tokens and summed logprob of a finished score output (all runs of a job)."""
    totals = {"records": 0, "errors": 0, "scored_records": 0, "tokens": 0, "logprob": 0.0}
    for rec in _output_records(path, fmt):
        totals["records"] += 1
        if rec.get("finish_reason") == "error":
            totals["errors"] += 1
            continue
        totals["scored_records"] += 1
        totals["tokens"] += int(rec["tokens"])
        totals["logprob"] += float(rec["logprob"])
    return totals


def _output_records(path: Path, fmt: str) -> Iterator[dict]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        cols = ["finish_reason", "tokens", "logprob"]
        pf = pq.ParquetFile(path)
        present = [c for c in cols if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=present):
            for row in batch.to_pylist():
                # extra record keys are JSON text columns in our Parquet output (io/writers.py)
                yield {k: (json.loads(v) if k != "finish_reason" and v is not None else v) for k, v in row.items()}
        return
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def corpus_summary(totals: dict) -> dict:
    n = totals["tokens"]
    mean = -totals["logprob"] / n if n else None
    return {"records": totals["scored_records"], "tokens": n, "logprob": totals["logprob"], "mean_nll": mean,
            "perplexity": math.exp(mean) if n else None}


def warm_up(engine: Engine) -> float:
    """Compile (or load) the kernels a scoring step uses; returns seconds spent."""
    t0 = time.perf_counter()
    slot = engine.kv.allocate()
    try:
        engine.step([(slot, np.array([0, 1], np.int32), 0, "all")])
        engine.step([(slot, np.array([2], np.int32), 2, False)])
    finally:
        engine.kv.free(slot)
    return time.perf_counter() - t0


def score_job(job: ScoreJobConfig, *, model=None, quiet: bool = False, out=sys.stderr) -> dict:
    """Run a whole score job; returns the summary (also written to ``<output>.meta.json``). SIGINT / SIGTERM
    stop it after the current step with ``JobInterrupted``."""
    from .interrupt import StopSignals

    with StopSignals() as stop:
        return _score_job(job, model, quiet, out, stop)


def _score_job(job: ScoreJobConfig, model, quiet: bool, out, stop) -> dict:
    from .runner import (job_logger, meta_path, open_job, peak_rss_mb, prefix_cache_line, prefix_cache_summary,
                         progress_bar, raise_if_stopped)

    log = job_logger(quiet, out)
    t_start = time.perf_counter()
    model, sha, sink = open_job(job, model, log)
    try:
        ecfg = job.engine
        engine = Engine(model, ecfg, logit_rows=max(ecfg.prefill_chunk, ecfg.max_batch))
        compile_s = warm_up(engine)
        log(f"kernels ready in {compile_s:.2f}s (JIT compile / cache load, not counted in item timings)")
        t_run = time.perf_counter()
        with progress_bar(lambda: count_records(list(job.inputs), job.input_format), quiet, out) as progress:
            stats = Scorer(job, model, progress=progress).run(sink, engine, stop)
        run_s = time.perf_counter() - t_run
        raise_if_stopped(stop, sink, job)
        final = sink.finalize()
        totals = output_totals(final, sink.fmt)
        corpus = corpus_summary(totals)
        summary = {
            "task": "score", "output": str(final), "format": sink.fmt,
            "model": {"path": str(model.path), "sha256": sha, "arch": model.config.arch, "name": model.config.name},
            "parameters": {"fields": asdict(job.fields), "token_logprobs": job.token_logprobs,
                           "engine": asdict(job.engine), "add_bos": bool(model.tokenizer.add_bos)},
            "items": {"total": stats.items, "ok": stats.ok, "error": stats.errors, "skipped_resume": stats.skipped,
                      "errors_in_output": totals["errors"]},
            "corpus": corpus,
            "this_run": {"records": stats.ok, "tokens": stats.scored, "logprob": stats.logprob, "rows": stats.rows},
            "prefix_cache": prefix_cache_summary(job.engine.prefix_cache, stats.rows + stats.cached, stats.cached),
            "time_s": {"load": round(model.load_s, 3), "compile": round(compile_s, 3), "run": round(run_s, 3),
                       "engine": round(stats.engine_s, 3), "total": round(time.perf_counter() - t_start, 3)},
            "throughput": {"tok_s": round(stats.rows / stats.engine_s, 2) if stats.engine_s else 0.0,
                           "items_per_s": round((stats.ok + stats.errors) / run_s, 3) if run_s else 0.0},
            "steps": stats.steps,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        meta_path(final).write_text(json.dumps(summary, indent=2) + "\n")    # still under the output's lock
    finally:
        sink.close()
    ppl = "n/a" if corpus["perplexity"] is None else f"{corpus['perplexity']:.4f}"
    log(f"done: {stats.ok} scored, {stats.errors} errors, {stats.skipped} already done | corpus perplexity {ppl} "
        f"over {corpus['tokens']} tokens in {corpus['records']} records | {summary['throughput']['tok_s']} tok/s | "
        f"{prefix_cache_line(summary['prefix_cache'])} -> {final}")
    return summary

