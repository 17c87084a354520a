"""The `run` job: a completion for every input item (sampling, stop strings, constraints, n samples).

``run_job(JobConfig)`` streams the input, turns each good record into a sequence (prompt tokens, sampling
parameters, a per-request seeded sampler, an optional grammar constraint), runs them through the job loop
(``jobs.loop``: continuous batching, prefix caching) and writes one record per input item as soon as it finishes
(crash-safe, resumable), then the ordered output and ``<output>.meta.json``. Per-item problems become error
records; only model, config and output errors stop the job.

With ``n`` > 1 samples per input (job ``n`` or the record's ``n``), an input becomes n sequences, sample k
seeded from (request seed, k), and n records carrying ``sample_index`` k; resume skips finished
(id, sample_index) pairs. With ``dedupe`` the samples of one input are held until all are done, and a sample
whose text equals an earlier (lower sample_index) one is dropped.
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..completion import Completion
from ..config import EngineConfig
from ..errors import BitnetBatchError, ConfigError, ContextOverflowError, InputError
from ..io.readers import BadRecord, RecordSpec, Request, request_spec
from ..records import error_record, timing
from ..sampling.constraints import ConstraintCompiler, ConstraintSpec, JsonLimits, MaskBatch, request_constraint
from ..sampling.params import SamplingParams, resolve_seed
from ..sampling.steps import without_ids
from ..scheduler import Part, Scheduler, Sequence
from .common import (JobBase, errors_in_output, peak_rss_mb, prefix_cache_line, prefix_cache_summary, summary_head,
                     summary_times)
from .loop import ItemStats, JobKind, run_local

TRUNCATE_MODES = (None, "left", "right")


@dataclass(frozen=True)
class JobConfig(JobBase):
    """One `bitnet-batch run` job."""
    prompt_field: str = "prompt"
    id_field: str = "id"
    system: str | None = None               # system message for chat-rendered prompts
    chat: bool = False                      # render plain `prompt` records with the chat template
    sampling: SamplingParams = field(default_factory=SamplingParams)   # job defaults, per-item overridable
    seed: int = 0                           # job seed: request seeds derive from (seed, id)
    truncate: str | None = None             # over-long prompts: None -> error record; "left" / "right"
    constraint: ConstraintSpec | None = None  # default structured-output constraint (records may override)
    json_limits: JsonLimits = field(default_factory=JsonLimits)   # bounds of JSON outputs (job's and records')
    dedupe: bool = False                    # drop samples whose text equals an earlier sample of the input
    template: object | None = None          # a pipeline's PromptTemplate: builds requests from raw records
    pipeline: str | None = None             # the pipeline file this job came from (for the summary only)

    def __post_init__(self):
        super().__post_init__()
        if self.truncate not in TRUNCATE_MODES:
            raise ConfigError(f"truncate must be one of left, right, got {self.truncate!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.dedupe, bool):
            raise ConfigError(f"dedupe must be true or false, got {self.dedupe!r}")
        if self.constraint is not None and not isinstance(self.constraint, ConstraintSpec):
            raise ConfigError(f"constraint must be a ConstraintSpec, got {type(self.constraint).__name__}")
        if not isinstance(self.json_limits, JsonLimits):
            raise ConfigError(f"json_limits must be a JsonLimits, got {type(self.json_limits).__name__}")
        if self.constraint is not None:     # the job's constraint is bounded by the job's limits
            object.__setattr__(self, "constraint", self.constraint.with_limits(self.json_limits))
        if self.template is not None and not callable(getattr(self.template, "requests", None)):
            raise ConfigError("template must have a requests(paths, fmt=, id_field=) method")

    def fingerprint(self, model_sha256: str) -> dict:
        """What determines the outputs (not batch size or threads: outputs do not depend on them). Keys of
        features left at their defaults are omitted, so older partial outputs stay resumable."""
        sampling = asdict(self.sampling)
        n = sampling.pop("n")                # recorded apart, and only when not 1, as before it was a sampling field
        fp = {"model_sha256": model_sha256, "sampling": sampling, "seed": self.seed,
              "system": self.system, "chat": self.chat, "prompt_field": self.prompt_field,
              "id_field": self.id_field, "truncate": self.truncate, "ffn_act": self.ffn_act,
              "inputs": [Path(p).name for p in self.inputs]}
        if self.constraint is not None:
            fp["constraint"] = self.constraint.describe()
        if self.json_limits != JsonLimits():
            fp["json_limits"] = self.json_limits.describe()
        if n != 1:
            fp["n"] = n
        if self.dedupe:
            fp["dedupe"] = True
        if self.template is not None:
            fp["template"] = self.template.describe()
        if self.engine.kv_dtype != "f32":
            fp["kv_dtype"] = self.engine.kv_dtype      # float16 K/V round differently: not the same outputs
        if self.engine.lm_head_dtype != "f32":
            fp["lm_head_dtype"] = self.engine.lm_head_dtype     # bfloat16 logits: not the same outputs either
        return fp


def sample_seed(base: int, sample_index: int) -> int:
    """Seed of sample k of a request whose own seed is ``base``: sample 0 keeps ``base`` (so n = 1 and the
    first of n samples agree), later ones hash (base, k), stable on every platform."""
    if sample_index == 0:
        return base
    digest = hashlib.sha256(f"bitnet-batch/sample/v1\x00{base}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class ItemPlan:
    """One input item, tokenized and parameterized; its samples share all of it but the seed."""
    request: Request
    ids: list                       # prompt token ids (after truncation)
    params: SamplingParams
    constraint: ConstraintSpec | None
    max_new: int                    # generation budget, clamped to the context


@dataclass
class ItemState:
    """The runner's per-request state, carried by its scheduler Sequence."""
    request: Request
    completion: Completion
    sample_index: int | None = None     # None when the item has a single sample (no sample_index field)
    group: "_Group | None" = None       # the item's samples held back for dedupe


@dataclass
class _Group:
    """The samples of one input under dedupe: records are held until every planned sample finished."""
    request: Request
    pending: int                                        # planned samples not finished yet
    records: dict = field(default_factory=dict)         # sample_index -> record


@dataclass
class JobStats(ItemStats):
    prompt_tokens: int = 0
    cached_tokens: int = 0    # prompt tokens served from the prefix cache (of prompt_tokens)
    completion_tokens: int = 0
    prefill_s: float = 0.0    # engine time attributed to prompt rows (pro rata by rows per step)
    decode_s: float = 0.0     # engine time attributed to decode rows
    sample_s: float = 0.0     # sampling + detokenization
    steps: int = 0
    constrained: int = 0      # records of constrained requests (errors excluded)
    incomplete: int = 0       # ... of which the grammar was not complete (max_tokens or a stop string)
    dropped: int = 0          # samples dropped by dedupe
    argmax_rows: int = 0      # logit rows of greedy steps through the argmax lm_head ...
    argmax_candidates: int = 0    # ... the float32 logits computed for them ...
    argmax_full_rows: int = 0     # ... and the rows among them that took the whole float32 lm_head

    def tally(self, record: dict) -> None:
        self.prompt_tokens += record["usage"]["prompt_tokens"]
        self.cached_tokens += record["usage"].get("cached_tokens", 0)
        self.completion_tokens += record["usage"]["completion_tokens"]
        if "incomplete" in record:
            self.constrained += 1
            self.incomplete += bool(record["incomplete"])


class RunKind(JobKind):
    """Generation: each item's samples are sequences with their own seeded sampler (``Completion``); a step's
    logits sample one token per sequence; a finished sample is a record (held for its group under dedupe)."""

    stats_class = JobStats
    config_class = JobConfig

    @classmethod
    def engine_config(cls, job: JobConfig) -> EngineConfig:
        """An argmax lm_head ("auto": where it is faster) when the job's own sampling wants argmax rows (greedy, no
        penalties or logprobs; constrained or not) or top-k rows (``SamplingParams.top_k_only``); records that
        override it take it where theirs does, else the float32 lm_head."""
        sampling = job.sampling
        return job.engine if sampling.argmax_only or sampling.top_k_only else super().engine_config(job)

    def __init__(self, job: JobConfig, model, engine, sink):
        super().__init__(job, model, engine, sink)
        self._compiler: ConstraintCompiler | None = None    # built on the first constrained request
        self._masks: MaskBatch | None = None                # parallel grammar masks, ditto
        self._keys = 0                                      # scheduler keys, unique per sequence
        self._ban_masks: dict = {}                          # banned ids -> the bitmask of every other token
        head = engine.argmax_head
        self._head_seen = (0, 0, 0) if head is None else (head.rows, head.candidates, head.full_rows)

    @classmethod
    def record_spec(cls, job: JobConfig) -> RecordSpec:
        """Requests from our own records or OpenAI batch lines; a pipeline template's own spec when it has one."""
        if job.template is None:
            return request_spec(prompt_field=job.prompt_field, id_field=job.id_field)
        spec = getattr(job.template, "record_spec", None)
        if spec is None:
            raise ConfigError(f"{type(job.template).__name__}: this prompt template cannot parse single records, "
                              f"so its pipeline cannot run with --engine ray")
        return spec(job.id_field)

    @classmethod
    def records_per_item(cls, job: JobConfig) -> int:
        return job.sampling.n

    @classmethod
    def partly_done(cls, job: JobConfig, item: Request, sink) -> list | None:
        """The written sample indices of an item with n > 1 samples (an invalid n: none, and ``plan`` reports
        it); None for a single-sample item."""
        n = item.overrides.get("n", job.sampling.n)
        if n == 1:
            return None
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            return []
        return [k for k in range(n) if sink.is_done(item.id, k)]

    def prepare(self) -> float:
        """llguidance's vocabulary view and the job grammar, built once."""
        if self.job.constraint is None:
            return 0.0
        t0 = time.perf_counter()
        self.compiler.prepare(self.job.constraint)
        return time.perf_counter() - t0

    @staticmethod
    def progress_fields(stats: JobStats, seconds: float) -> dict:
        return {"tok_s": f"{stats.completion_tokens / max(1e-9, seconds):.1f}"}

    @classmethod
    def summary(cls, job: JobConfig, stats: JobStats, ctx: dict) -> dict:
        run_s = ctx["run_s"]
        return {
            **summary_head(ctx, stats, errors_in_output(ctx)),
            "parameters": {"sampling": asdict(job.sampling), "seed": job.seed, "system": job.system,
                           "chat": job.chat, "truncate": job.truncate, "engine": asdict(job.engine),
                           "threads": ctx["threads"],
                           "constraint": None if job.constraint is None else job.constraint.describe(),
                           "json_limits": job.json_limits.describe(),
                           "n": job.sampling.n, "dedupe": job.dedupe, "pipeline": job.pipeline},
            "tokens": {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens},
            "prefix_cache": prefix_cache_summary(job.engine.prefix_cache, stats.prompt_tokens, stats.cached_tokens),
            "time_s": {**summary_times(ctx), "prefill": round(stats.prefill_s, 3), "decode": round(stats.decode_s, 3),
                       "sampling": round(stats.sample_s, 3)},
            "throughput": {   # prefill / decode: per engine-second; completion / items: of the whole job
                "prefill_tok_s": (round((stats.prompt_tokens - stats.cached_tokens) / stats.prefill_s, 2)
                                  if stats.prefill_s else 0.0),
                "decode_tok_s": round(stats.completion_tokens / stats.decode_s, 2) if stats.decode_s else 0.0,
                "completion_tok_s": round(stats.completion_tokens / run_s, 2) if run_s else 0.0,
                "items_per_s": round((stats.ok + stats.errors) / run_s, 3) if run_s else 0.0},
            "steps": stats.steps,
            "structured": {"records": stats.constrained, "incomplete": stats.incomplete},
            "samples": {"n": job.sampling.n, "dedupe": job.dedupe, "dropped_duplicates": stats.dropped},
            "argmax_head": {"rows": stats.argmax_rows, "full_rows": stats.argmax_full_rows,
                            "candidates_per_row": round(stats.argmax_candidates
                                                        / max(1, stats.argmax_rows - stats.argmax_full_rows), 2)},
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }

    @classmethod
    def done_line(cls, job: JobConfig, stats: JobStats, summary: dict) -> str:
        s = stats
        return (f"done: {s.ok} ok, {s.errors} errors, {s.skipped} already done | prefill "
                f"{summary['throughput']['prefill_tok_s']} tok/s, decode {summary['throughput']['decode_tok_s']} "
                f"tok/s | {prefix_cache_line(summary['prefix_cache'])} | peak RSS {summary['peak_rss_mb']} MB -> "
                f"{summary['output']}")

    @property
    def compiler(self) -> ConstraintCompiler:
        if self._compiler is None:
            self._compiler = ConstraintCompiler.for_tokenizer(self.tok)
        return self._compiler

    # ---------------------------------------------------------------- input -> sequences
    def plan(self, req: Request) -> ItemPlan:
        """Tokenize and parameterize one request; raises BitnetBatchError subclasses for per-item problems."""
        try:
            params = SamplingParams.from_overrides(self.job.sampling, req.overrides)
        except ConfigError as e:
            field = next((k for k in req.overrides if str(e).startswith(k)), None)
            raise InputError(str(e), location=req.location, field=field) from None
        spec = request_constraint(req.overrides, self.job.constraint, req.location, self.job.json_limits)
        if spec is not None:
            try:
                self.compiler.prepare(spec)
            except ConfigError as e:
                raise InputError(str(e), location=req.location, field=spec.field.split(".")[0]) from None
        ids = self._prompt_ids(req)
        limit = self.engine.max_seq_len
        if len(ids) >= limit:
            if self.job.truncate is None:
                raise ContextOverflowError(f"{req.location}: prompt has {len(ids)} tokens; the context holds "
                                           f"{limit} (prompt + at least 1 generated token). Use --truncate "
                                           f"left|right to cut it")
            keep = max(1, limit - max(1, min(params.max_tokens, limit // 2)))
            ids = ids[len(ids) - keep:] if self.job.truncate == "left" else ids[:keep]
        max_new = min(params.max_tokens, limit - len(ids))
        return ItemPlan(req, ids, params, spec, max_new)

    def sequence(self, plan: ItemPlan, sample_index: int | None, group: _Group | None = None) -> Sequence:
        """Sample ``sample_index`` (None: the only one) of a planned item, with its own seed and grammar."""
        req = plan.request
        seed = resolve_seed(plan.params, self.job.seed, req.id)
        if sample_index is not None:
            seed = sample_seed(seed, sample_index)
        constraint = self.compiler.make(plan.constraint) if plan.constraint is not None else None
        comp = Completion(self.tok, plan.params, seed, plan.ids, plan.max_new, constraint=constraint)
        self._keys += 1
        return Sequence(key=self._keys, prompt=np.asarray(plan.ids, np.int32), max_new=plan.max_new,
                        state=ItemState(req, comp, sample_index, group))

    def todo(self, plan: ItemPlan, sink) -> list | None:
        """The sample indices to generate for ``plan`` ([None] for a single-sample item), or None when the
        output already has everything (resume). Under dedupe a partly written item is generated again in
        full (outputs are deterministic) so its duplicates are judged against every earlier sample."""
        rid = plan.request.id
        n = plan.params.n
        if n == 1:
            return None if rid in sink.done else [None]
        if rid not in sink.done:
            return list(range(n))
        written = [k for k in range(n) if sink.is_done(rid, k)]
        if not written or len(written) == n:      # an error record for the whole item, or all samples
            return None
        return list(range(n)) if self.job.dedupe else [k for k in range(n) if k not in written]

    def _prompt_ids(self, req: Request) -> list[int]:
        messages = req.messages
        if messages is None and (self.job.chat or self.job.system):
            messages = [{"role": "user", "content": req.prompt}]
        if messages is None:
            try:
                return self.tok.encode(req.prompt, add_bos=self.tok.add_bos)
            except InputError as e:
                raise InputError(str(e), location=req.location, field=self.job.prompt_field) from None
        if self.job.system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.job.system}] + list(messages)
        try:
            return self.tok.apply_chat_template(messages)
        except InputError as e:
            raise InputError(str(e), location=req.location, field=e.field or "messages") from None

    # ---------------------------------------------------------------- records
    def result_record(self, seq: Sequence, now: float) -> dict:
        st: ItemState = seq.state
        comp = st.completion
        n = len(comp.tokens)
        rec = {"id": st.request.id, "index": st.request.index, "text": comp.text,
               "finish_reason": comp.finish_reason or "length",
               "usage": {"prompt_tokens": int(len(seq.prompt)), "completion_tokens": n,
                         "cached_tokens": seq.n_cached},
               "timing": timing(seq.t_enqueue, seq.t_admit, seq.t_first or now, now, n), "error": None}
        if comp.params.logprobs is not None:
            rec["logprobs"] = comp.logprobs
        if st.sample_index is not None:
            rec["sample_index"] = st.sample_index
        rec.update(comp.structured())
        return rec

    # ---------------------------------------------------------------- the loop's interface
    def items(self):
        job = self.job
        self._t0 = time.perf_counter()
        if job.template is not None:
            return job.template.requests(list(job.inputs), fmt=job.input_format, id_field=job.id_field)
        return super().items()

    def want(self, part: Part) -> bool:
        return part.want_logits

    def wants(self, parts: list[Part]) -> list:
        """A greedy sequence's logits as "argmax" (under "auto" while the screen pays: ``argmax_pays``), a top-k one's
        as ("top_k", k, mask) (the engine may compute the float32 logits near the largest alone), with its
        constraint's mask for this position (computed here, together, then kept for the sampler) less the ids
        ``ignore_eos`` bans."""
        head = self.engine.argmax_head
        if head is None:
            return [p.want_logits for p in parts]
        forced = self.engine.config.argmax_head != "auto"
        if not forced and head.retire_if_unpaying():
            return [p.want_logits for p in parts]
        argmax, top_k = int(forced or head.argmax_pays), head.top_k_pays
        ks = [(argmax if p.seq.state.completion.argmax_only else top_k and p.seq.state.completion.top_k_only)
              if p.want_logits else 0 for p in parts]
        self._fill_masks([p.seq for p, k in zip(parts, ks) if k])
        out = []
        for p, k in zip(parts, ks):
            constraint = p.seq.state.completion.constraint
            if not k:
                out.append(p.want_logits)
                continue
            try:
                mask = None if constraint is None else constraint.allowed_tokens()
            except BitnetBatchError:              # a grammar in error: the sampler reports it, as without this
                out.append(True)
                continue
            banned = p.seq.state.completion.banned_ids
            if banned and mask is None:           # ignore_eos: the ids it bans are out of the running too
                mask = self._ban_masks.get(banned)
                if mask is None:
                    mask = self._ban_masks[banned] = without_ids(None, banned, self.tok.vocab_size)
            elif banned:
                mask = without_ids(mask, banned, self.tok.vocab_size)
            out.append(("top_k", k, mask) if k > 1 else "argmax" if mask is None else ("argmax", mask))
        return out

    def advance(self, sched: Scheduler, parts: list[Part], outs: list, t0: float, t1: float) -> None:
        """Attribute the step's time to prompt and decode rows, then sample a token for each sequence that got
        logits (the grammar masks of the constrained ones computed together first)."""
        stats = self.stats
        n_rows = sum(len(p.tokens) for p in parts)
        n_prefill = sum(len(p.tokens) for p in parts if p.seq.prefilling or p.start < len(p.seq.prompt))
        stats.prefill_s += (t1 - t0) * n_prefill / n_rows
        stats.decode_s += (t1 - t0) * (n_rows - n_prefill) / n_rows
        stats.steps += 1
        head = self.engine.argmax_head
        if head is not None:
            stats.argmax_rows, stats.argmax_candidates, stats.argmax_full_rows = (
                stats.argmax_rows + head.rows - self._head_seen[0], stats.argmax_candidates + head.candidates
                - self._head_seen[1], stats.argmax_full_rows + head.full_rows - self._head_seen[2])
            self._head_seen = (head.rows, head.candidates, head.full_rows)
        self._fill_masks([p.seq for p, logits in zip(parts, outs) if logits is not None])
        for p, logits in zip(parts, outs):
            if logits is not None:
                self._advance(sched, p.seq, logits, t1)
        stats.sample_s += time.perf_counter() - t1

    def _fill_masks(self, seqs: list[Sequence]) -> None:
        """The grammar masks of this step's constrained requests, computed together in parallel (those computed
        already, before the step, are kept: ``MaskBatch.fill``)."""
        constraints = [s.state.completion.constraint for s in seqs if s.state.completion.constraint is not None]
        if len(constraints) < 2:
            return
        if self._masks is None:
            import numba

            self._masks = MaskBatch(self.tok.vocab_size, threads=numba.get_num_threads())
        self._masks.fill(constraints)

    def start(self, item) -> list[Sequence]:
        """The sequences of one input item still to be generated; error records, resume skips and items with
        nothing to generate (no model work) are done here."""
        self.stats.items += 1
        sink = self.sink
        if isinstance(item, BadRecord):
            if item.id in sink.done:
                self.emit.skip(self.job.sampling.n)
            else:
                self.emit.write(error_record(item.index, item.id, item.error))
            return []
        try:
            plan = self.plan(item)
        except BitnetBatchError as e:
            if item.id in sink.done:
                self.emit.skip(self.job.sampling.n)
            else:
                self.emit.write(error_record(item.index, item.id, e))
            return []
        todo = self.todo(plan, sink)
        if todo is None:
            self.emit.skip(self.job.sampling.n)
            return []
        group = _Group(item, pending=len(todo)) if self.job.dedupe and plan.params.n > 1 else None
        seqs = [self.sequence(plan, k, group) for k in todo]
        if plan.max_new > 0:
            return seqs
        for seq in seqs:                                 # nothing to generate
            seq.t_enqueue = seq.t_admit = time.perf_counter()
            seq.state.completion.finish_reason = "length"
            self._finish(seq.state, self.result_record(seq, seq.t_admit))
        return []

    def _advance(self, sched: Scheduler, seq: Sequence, logits, t_step: float) -> None:
        """Sample one token for ``seq``; retire it and hand its record on when it is done."""
        st: ItemState = seq.state
        comp = st.completion
        try:
            comp.push(logits)
            if not seq.generated:
                seq.t_first = t_step
            seq.generated.append(comp.tokens[-1])
        except BitnetBatchError as e:
            sched.retire(seq)
            self._finish(st, error_record(st.request.index, st.request.id, e, prompt_tokens=len(seq.prompt),
                                          sample_index=st.sample_index))
            return
        if comp.done:
            sched.retire(seq)
            self._finish(st, self.result_record(seq, time.perf_counter()))

    def _finish(self, st: ItemState, record: dict) -> None:
        """A finished sample: written at once, or held in its dedupe group until the group is complete."""
        group = st.group
        if group is None:
            self.emit.write(record)
            return
        group.records[st.sample_index] = record
        group.pending -= 1
        if group.pending == 0:
            self._flush_group(group)

    def _flush_group(self, group: _Group) -> None:
        """Write a deduped group in sample order: a sample whose text an earlier sample already had is dropped;
        samples an interrupted run already wrote are not written again. Drops are counted once per run that
        writes something of the group."""
        seen, dropped, keep = set(), 0, []
        for k in sorted(group.records):
            record = group.records[k]
            if record["finish_reason"] != "error":
                if record["text"] in seen:
                    dropped += 1
                    continue
                seen.add(record["text"])
            if not self.sink.is_done(group.request.id, k):
                keep.append(record)
        if keep:
            self.stats.dropped += dropped
        for record in keep:
            self.emit.write(record)
        if dropped:
            self.emit.tick(dropped)


def run_job(job: JobConfig, *, model=None, quiet: bool = False, out=sys.stderr) -> dict:
    """Run a whole job; returns the summary (also written to ``<output>.meta.json``). SIGINT / SIGTERM stop it
    after the current step with ``JobInterrupted``."""
    return run_local(job, RunKind, model=model, quiet=quiet, out=out)
