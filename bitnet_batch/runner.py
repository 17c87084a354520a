"""The batch job: the only place that wires reader -> scheduler -> engine -> sampler -> writer.

``run_job(JobConfig)`` streams the input, turns each good record into a sequence (prompt tokens, sampling
parameters, a per-request seeded sampler), runs them with continuous batching, and writes one record per
input item as soon as it finishes (crash-safe, resumable), then the ordered output and ``<output>.meta.json``.
Per-item problems become error records; only model, config and output errors stop the job.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .engine.engine import Engine, EngineConfig
from .errors import BitnetBatchError, ConfigError, ContextOverflowError, InputError
from .io.readers import BadRecord, Request, count_records, read_requests
from .io.writers import OutputSink
from .completion import Completion
from .sampling.chain import make_sampler
from .sampling.params import SamplingParams, resolve_seed
from .scheduler import Scheduler, Sequence

TRUNCATE_MODES = (None, "left", "right")


@dataclass(frozen=True)
class JobConfig:
    """One `bitnet-batch run` job."""
    inputs: tuple[str, ...]                 # input files (JSONL / Parquet), read in order
    output: str                             # output path; format from the extension or output_format
    model: str                              # GGUF path or Hugging Face repo id
    model_file: str | None = None           # file inside a hub repo
    output_format: str | None = None        # "jsonl" | "parquet" | "openai"
    input_format: str | None = None         # force "jsonl" / "parquet" for all inputs
    prompt_field: str = "prompt"
    id_field: str = "id"
    system: str | None = None               # system message for chat-rendered prompts
    chat: bool = False                      # render plain `prompt` records with the chat template
    sampling: SamplingParams = field(default_factory=SamplingParams)   # job defaults, per-item overridable
    seed: int = 0                           # job seed: request seeds derive from (seed, id)
    truncate: str | None = None             # over-long prompts: None -> error record; "left" / "right"
    ordered: bool = True                    # output in input order (else as items finish; JSONL only)
    overwrite: bool = False
    ffn_act: str | None = None              # override the model's FFN activation
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):
        if not self.inputs:
            raise ConfigError("at least one input file is required")
        if self.truncate not in TRUNCATE_MODES:
            raise ConfigError(f"truncate must be one of left, right, got {self.truncate!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")

    def fingerprint(self, model_sha256: str) -> dict:
        """What determines the outputs (not batch size or threads: outputs do not depend on them)."""
        return {"model_sha256": model_sha256, "sampling": asdict(self.sampling), "seed": self.seed,
                "system": self.system, "chat": self.chat, "prompt_field": self.prompt_field,
                "id_field": self.id_field, "truncate": self.truncate, "ffn_act": self.ffn_act,
                "inputs": [Path(p).name for p in self.inputs]}


@dataclass
class ItemState:
    """The runner's per-request state, carried by its scheduler Sequence."""
    request: Request
    completion: Completion


@dataclass
class JobStats:
    items: int = 0
    ok: int = 0
    errors: int = 0
    skipped: int = 0          # finished by an earlier run (resume)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0    # engine time attributed to prompt rows (pro rata by rows per step)
    decode_s: float = 0.0     # engine time attributed to decode rows
    sample_s: float = 0.0     # sampling + detokenization
    steps: int = 0


class Runner:
    def __init__(self, job: JobConfig, model, *, progress=None, log=None):
        self.job = job
        self.model = model
        self.tok = model.tokenizer
        self.stats = JobStats()
        self.progress = progress
        self.log = log or (lambda msg: None)

    # ---------------------------------------------------------------- input -> sequences
    def prepare(self, req: Request) -> Sequence:
        """Tokenize and parameterize one request; raises BitnetBatchError subclasses for per-item problems."""
        try:
            params = SamplingParams.from_overrides(self.job.sampling, req.overrides)
        except ConfigError as e:
            field = next((k for k in req.overrides if str(e).startswith(k)), None)
            raise InputError(str(e), location=req.location, field=field) from None
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
        seed = resolve_seed(params, self.job.seed, req.id)
        state = ItemState(req, Completion(self.tok, params, seed, ids, max_new))
        return Sequence(key=req.index, prompt=np.asarray(ids, np.int32), max_new=max_new, state=state)

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
    @staticmethod
    def error_record(index: int, rid, err: Exception, *, prompt_tokens: int = 0) -> dict:
        return {"id": rid if rid is not None else f"row-{index}", "index": index, "text": None,
                "finish_reason": "error", "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0},
                "timing": {k: 0.0 for k in ("queue_s", "prefill_s", "ttft_s", "decode_s", "total_s",
                                            "tokens_per_s")},
                "error": {"type": type(err).__name__, "message": str(err)}}

    def result_record(self, seq: Sequence, now: float) -> dict:
        st: ItemState = seq.state
        comp = st.completion
        n = len(comp.tokens)
        t_first = seq.t_first or now
        busy = now - seq.t_admit
        rec = {"id": st.request.id, "index": st.request.index, "text": comp.text,
               "finish_reason": comp.finish_reason or "length",
               "usage": {"prompt_tokens": int(len(seq.prompt)), "completion_tokens": n},
               "timing": {"queue_s": round(seq.t_admit - seq.t_enqueue, 6),
                          "prefill_s": round(t_first - seq.t_admit, 6),
                          "ttft_s": round(t_first - seq.t_enqueue, 6),
                          "decode_s": round(now - t_first, 6),
                          "total_s": round(now - seq.t_enqueue, 6),
                          "tokens_per_s": round(n / busy, 3) if busy > 0 else 0.0},
               "error": None}
        if comp.params.logprobs is not None:
            rec["logprobs"] = comp.logprobs
        return rec

    # ---------------------------------------------------------------- the loop
    def run(self, sink: OutputSink, engine: Engine) -> JobStats:
        self.engine = engine
        job, stats = self.job, self.stats
        sched = Scheduler(engine.kv, engine.config.max_batch, engine.max_rows)
        reader = read_requests(list(job.inputs), prompt_field=job.prompt_field, id_field=job.id_field,
                               fmt=job.input_format)
        exhausted = False
        lookahead = 2 * engine.config.max_batch + 2

        def emit(record):
            sink.write(record)
            if record["finish_reason"] == "error":
                stats.errors += 1
            else:
                stats.ok += 1
                stats.prompt_tokens += record["usage"]["prompt_tokens"]
                stats.completion_tokens += record["usage"]["completion_tokens"]
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix(tok_s=f"{stats.completion_tokens / max(1e-9, self._elapsed()):.1f}",
                                          refresh=False)

        self._t0 = time.perf_counter()
        while True:
            while not exhausted and len(sched.waiting) < lookahead:
                item = next(reader, None)
                if item is None:
                    exhausted = True
                    break
                stats.items += 1
                if item.id in sink.done:
                    stats.skipped += 1
                    if self.progress is not None:
                        self.progress.update(1)
                    continue
                if isinstance(item, BadRecord):
                    emit(self.error_record(item.index, item.id, item.error))
                    continue
                try:
                    seq = self.prepare(item)
                except BitnetBatchError as e:
                    emit(self.error_record(item.index, item.id, e))
                    continue
                if seq.max_new == 0:                 # nothing to generate: no model work
                    seq.t_enqueue = seq.t_admit = time.perf_counter()
                    seq.state.completion.finish_reason = "length"
                    emit(self.result_record(seq, seq.t_admit))
                else:
                    sched.add(seq)
            sched.admit()
            parts = sched.plan()
            if not parts:
                if exhausted and not sched.waiting and not sched.running:
                    break
                continue
            t0 = time.perf_counter()
            outs = engine.step([(p.seq.slot, p.tokens, p.start, p.want_logits) for p in parts])
            t1 = time.perf_counter()
            n_rows = sum(len(p.tokens) for p in parts)
            n_prefill = sum(len(p.tokens) for p in parts if p.seq.prefilling or p.start < len(p.seq.prompt))
            stats.prefill_s += (t1 - t0) * n_prefill / n_rows
            stats.decode_s += (t1 - t0) * (n_rows - n_prefill) / n_rows
            stats.steps += 1
            for p, logits in zip(parts, outs):
                if logits is None:
                    continue
                seq = p.seq
                comp = seq.state.completion
                try:
                    comp.push(logits)
                    if not seq.generated:
                        seq.t_first = t1
                    seq.generated.append(comp.tokens[-1])
                except BitnetBatchError as e:
                    sched.retire(seq)
                    emit(self.error_record(seq.state.request.index, seq.state.request.id, e,
                                           prompt_tokens=len(seq.prompt)))
                    continue
                if comp.done:
                    sched.retire(seq)
                    emit(self.result_record(seq, time.perf_counter()))
            stats.sample_s += time.perf_counter() - t1
        return stats

    def _elapsed(self) -> float:
        return time.perf_counter() - self._t0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def warm_up(engine: Engine) -> float:
    """Compile (or load from cache) every kernel specialization the job uses; returns seconds spent."""
    t0 = time.perf_counter()
    slot = engine.kv.allocate()
    try:
        engine.step([(slot, np.array([0, 1], np.int32), 0, True)])
        engine.step([(slot, np.array([2], np.int32), 2, True)])
    finally:
        engine.kv.free(slot)
    make_sampler(SamplingParams(temperature=1.0, top_k=5, top_p=0.9, min_p=0.01, repetition_penalty=1.1),
                 0, engine.model.config.n_vocab).sample(np.zeros(engine.model.config.n_vocab, np.float32))
    return time.perf_counter() - t0


def meta_path(output) -> Path:
    p = Path(output)
    return p.with_name(p.name + ".meta.json")


def run_job(job: JobConfig, *, model=None, quiet: bool = False, out=sys.stderr) -> dict:
    """Run a whole job; returns the summary (also written to ``<output>.meta.json``)."""
    from .model.model import load_model

    def log(msg):
        if not quiet:
            print(msg, file=out, flush=True)

    t_start = time.perf_counter()
    if model is None:
        model = load_model(job.model, filename=job.model_file, ffn_act=job.ffn_act)
    log(f"model: {model.path} ({model.config.arch}, {model.config.n_layer} layers, vocab {model.config.n_vocab}) "
        f"loaded in {model.load_s:.2f}s")
    sha = model.sha256()
    sink = OutputSink(job.output, fmt=job.output_format, fingerprint=job.fingerprint(sha),
                      overwrite=job.overwrite, ordered=job.ordered, model_name=model.config.name or model.path.name)
    try:
        if sink.done:
            log(f"resuming: {len(sink.done)} items already done")
        engine = Engine(model, job.engine)
        compile_s = warm_up(engine)
        log(f"kernels ready in {compile_s:.2f}s (JIT compile / cache load, not counted in item timings)")
        total = count_records(list(job.inputs), job.input_format)
        progress = None
        if not quiet:
            from tqdm import tqdm
            progress = tqdm(total=total, unit="item", file=out, disable=None, dynamic_ncols=True)
        runner = Runner(job, model, progress=progress, log=log)
        t_run = time.perf_counter()
        try:
            stats = runner.run(sink, engine)
        finally:
            if progress is not None:
                progress.close()
        run_s = time.perf_counter() - t_run
        final = sink.finalize()
    finally:
        sink.close()
    summary = {
        "output": str(final), "format": sink.fmt,
        "model": {"path": str(model.path), "sha256": sha, "arch": model.config.arch, "name": model.config.name},
        "parameters": {"sampling": asdict(job.sampling), "seed": job.seed, "system": job.system, "chat": job.chat,
                       "truncate": job.truncate, "engine": asdict(job.engine), "threads": _threads()},
        "items": {"total": stats.items, "ok": stats.ok, "error": stats.errors, "skipped_resume": stats.skipped,
                  "errors_in_output": count_errors(final, sink.fmt)},
        "tokens": {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens},
        "time_s": {"load": round(model.load_s, 3), "compile": round(compile_s, 3), "run": round(run_s, 3),
                   "total": round(time.perf_counter() - t_start, 3), "prefill": round(stats.prefill_s, 3),
                   "decode": round(stats.decode_s, 3), "sampling": round(stats.sample_s, 3)},
        "throughput": {
            "prefill_tok_s": round(stats.prompt_tokens / stats.prefill_s, 2) if stats.prefill_s else 0.0,
            "decode_tok_s": round(stats.completion_tokens / stats.decode_s, 2) if stats.decode_s else 0.0,
            "completion_tok_s": round(stats.completion_tokens / run_s, 2) if run_s else 0.0,
            "items_per_s": round((stats.ok + stats.errors) / run_s, 3) if run_s else 0.0},
        "steps": stats.steps,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    meta = meta_path(final)
    meta.write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done: {stats.ok} ok, {stats.errors} errors, {stats.skipped} already done | "
        f"prefill {summary['throughput']['prefill_tok_s']} tok/s, decode {summary['throughput']['decode_tok_s']} "
        f"tok/s | peak RSS {summary['peak_rss_mb']} MB -> {final}")
    return summary


def count_errors(path: Path, fmt: str) -> int:
    """Error records in a finished output (this run's and earlier runs' of a resumed job)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        col = pq.read_table(path, columns=["finish_reason"]).column("finish_reason").to_pylist()
        return sum(1 for v in col if v == "error")
    n = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            n += rec.get("finish_reason") == "error" if fmt == "jsonl" else rec.get("error") is not None
    return n


def _threads() -> int:
    import numba
    return numba.get_num_threads()
