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

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..config import EngineConfig
from ..engine.engine import Engine
from ..errors import BitnetBatchError, ConfigError, ContextOverflowError, InputError
from ..io import readers
from ..io.readers import BadRecord
from ..records import error_record, read_records, timing
from ..scheduler import Part, Scheduler, Sequence
from .common import JobBase, peak_rss_mb, prefix_cache_line, prefix_cache_summary, summary_head, summary_times
from .loop import ItemStats, JobKind, run_local

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
    return readers.read_items(paths, score_spec(fields), fmt=fmt)


def score_spec(fields: ScoreFields = ScoreFields()) -> readers.RecordSpec:
    """Records -> ``ScoreItem`` (``text``, or ``prompt`` + ``completion``)."""
    def parse(record: dict, index: int, record_id, location: str) -> ScoreItem:
        text, prompt, completion = _read_texts(record, fields)
        return ScoreItem(index=index, id=record_id, text=text, prompt=prompt, completion=completion,
                         location=location)

    return readers.RecordSpec(parse, id_field=fields.id)


def _read_texts(record: dict, fields: ScoreFields) -> tuple[str | None, str | None, str | None]:
    """-> (text, None, None) or (None, prompt, completion), checked: strings, text / completion non-empty."""
    has_text, has_completion = fields.text in record, fields.completion in record
    if has_text and (has_completion or fields.prompt in record):
        other = fields.completion if has_completion else fields.prompt
        raise InputError(f"record has both field {fields.text!r} and field {other!r}; give {fields.text!r} "
                         f"alone or {fields.prompt!r} + {fields.completion!r}", field=fields.text)
    if not has_text and not has_completion:
        hint = f" ({fields.prompt!r} needs {fields.completion!r})" if fields.prompt in record else \
            readers.other_fields(record, "--text-field", fields.id)
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
class ScoreJobConfig(JobBase):
    """One `bitnet-batch score` job (output_format: "jsonl" or "parquet")."""
    fields: ScoreFields = field(default_factory=ScoreFields)
    token_logprobs: bool = False            # add each scored token's logprob to the record

    def __post_init__(self):
        super().__post_init__()
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
        if self.engine.lm_head_dtype != "f32":
            fp["lm_head_dtype"] = self.engine.lm_head_dtype
        return fp


@dataclass
class _ScoreState:
    """What a Sequence carries through the scheduler: where scoring starts and the sums so far."""
    item: ScoreItem
    first: int                              # position of the first scored token = unscored tokens before it
    logprobs: list = field(default_factory=list)     # float log p of each scored token so far, in order


@dataclass
class ScoreStats(ItemStats):
    rows: int = 0               # tokens run through the model
    cached: int = 0             # tokens served from the prefix cache instead (this run)
    scored: int = 0             # tokens scored (this run)
    logprob: float = 0.0        # sum over this run's scored records
    engine_s: float = 0.0
    steps: int = 0

    def tally(self, record: dict) -> None:
        self.cached += record["usage"]["cached_tokens"]
        self.scored += record["tokens"]
        self.logprob += record["logprob"]


class ScoreKind(JobKind):
    """Scoring: each item is one sequence, prefilled in batched steps; the logits of the rows that predict
    scored tokens are reduced to log-probabilities as they come, and the record is written when the last chunk
    is done."""

    stats_class = ScoreStats
    config_class = ScoreJobConfig

    def __init__(self, job: ScoreJobConfig, model, engine, sink):
        super().__init__(job, model, engine, sink)
        self._keys = 0

    @staticmethod
    def engine_for(model, config: EngineConfig) -> Engine:
        return Engine(model, config, logit_rows=max(config.prefill_chunk, config.max_batch))   # every row's

    @classmethod
    def record_spec(cls, job: ScoreJobConfig) -> readers.RecordSpec:
        return score_spec(job.fields)

    def facts(self) -> dict:
        return {"add_bos": bool(self.tok.add_bos)}

    @classmethod
    def summary(cls, job: ScoreJobConfig, stats: ScoreStats, ctx: dict) -> dict:
        """The corpus perplexity over every scored record of the output (earlier runs' of a resumed job too)."""
        run_s = ctx["run_s"]
        totals = output_totals(ctx["files"], ctx["fmt"])
        return {
            "task": "score", **summary_head(ctx, stats, totals["errors"]),
            "parameters": {"fields": asdict(job.fields), "token_logprobs": job.token_logprobs,
                           "engine": asdict(job.engine), "add_bos": ctx["facts"]["add_bos"]},
            "corpus": corpus_summary(totals),
            "this_run": {"records": stats.ok, "tokens": stats.scored, "logprob": stats.logprob, "rows": stats.rows},
            "prefix_cache": prefix_cache_summary(job.engine.prefix_cache, stats.rows + stats.cached, stats.cached),
            "time_s": {**summary_times(ctx), "engine": round(stats.engine_s, 3)},
            "throughput": {"tok_s": round(stats.rows / stats.engine_s, 2) if stats.engine_s else 0.0,
                           "items_per_s": round((stats.ok + stats.errors) / run_s, 3) if run_s else 0.0},
            "steps": stats.steps,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }

    @classmethod
    def done_line(cls, job: ScoreJobConfig, stats: ScoreStats, summary: dict) -> str:
        s, corpus = stats, summary["corpus"]
        ppl = "n/a" if corpus["perplexity"] is None else f"{corpus['perplexity']:.4f}"
        return (f"done: {s.ok} scored, {s.errors} errors, {s.skipped} already done | corpus perplexity {ppl} over "
                f"{corpus['tokens']} tokens in {corpus['records']} records | {summary['throughput']['tok_s']} tok/s | "
                f"{prefix_cache_line(summary['prefix_cache'])} -> {summary['output']}")

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

    # ---------------------------------------------------------------- the loop's interface
    def want(self, part: Part):
        """Every row's logits once a chunk reaches the row before the first scored token."""
        return "all" if part.start + len(part.tokens) >= part.seq.state.first else False

    def start(self, item) -> list[Sequence]:
        if self.settled(item):
            return []
        try:
            return [self.plan(item)]
        except BitnetBatchError as e:
            self.emit.write(error_record(item.index, item.id, e))
            return []

    def advance(self, sched: Scheduler, parts: list[Part], outs: list, t0: float, t1: float) -> None:
        """Add up the step's log-probabilities; a sequence whose last chunk ran is retired and written."""
        self.stats.engine_s += t1 - t0
        self.stats.steps += 1
        self.stats.rows += sum(len(p.tokens) for p in parts)
        for p, logits in zip(parts, outs):
            if logits is not None:
                self._accumulate(p.seq, p.start, logits)
            if not p.seq.prefilling:
                sched.retire(p.seq)
                self.emit.write(self._record(p.seq, time.perf_counter()))

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
        rec = {"id": st.item.id, "index": st.item.index, "text": None, "finish_reason": "scored",
               "usage": {"prompt_tokens": st.first, "completion_tokens": n, "cached_tokens": seq.n_cached},
               "timing": timing(seq.t_enqueue, seq.t_admit, now, now, len(seq.prompt)),    # all of it is prefill
               "error": None, **score_fields(math.fsum(st.logprobs), n)}     # fsum: exact, order-free
        if self.job.token_logprobs:
            ids = seq.prompt[st.first:].tolist()
            rec["logprobs"] = [{"token": self.tok.decode([t]), "token_id": t, "logprob": v}
                               for t, v in zip(ids, st.logprobs)]
        return rec


def score_fields(logprob: float, n: int) -> dict:
    """The score keys of a record from the summed log-probability of n scored tokens."""
    mean_nll = -logprob / n
    return {"logprob": logprob, "tokens": n, "mean_nll": mean_nll, "perplexity": math.exp(mean_nll)}


def output_totals(paths: list[Path], fmt: str) -> dict:
    """Records, errors, scored tokens and summed logprob of a finished score output's files (all runs of a
    job)."""
    totals = {"records": 0, "errors": 0, "scored_records": 0, "tokens": 0, "logprob": 0.0}
    for path in paths:
        for rec in read_records(path, fmt, columns=["finish_reason", "tokens", "logprob"]):
            totals["records"] += 1
            if rec.get("finish_reason") == "error":
                totals["errors"] += 1
                continue
            totals["scored_records"] += 1
            totals["tokens"] += int(rec["tokens"])
            totals["logprob"] += float(rec["logprob"])
    return totals


def corpus_summary(totals: dict) -> dict:
    n = totals["tokens"]
    mean = -totals["logprob"] / n if n else None
    return {"records": totals["scored_records"], "tokens": n, "logprob": totals["logprob"], "mean_nll": mean,
            "perplexity": math.exp(mean) if n else None}


def score_job(job: ScoreJobConfig, *, model=None, quiet: bool = False, out=sys.stderr) -> dict:
    """Run a whole score job; returns the summary (also written to ``<output>.meta.json``). SIGINT / SIGTERM
    stop it after the current step with ``JobInterrupted``."""
    return run_local(job, ScoreKind, model=model, quiet=quiet, out=out)
