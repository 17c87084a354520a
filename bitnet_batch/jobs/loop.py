"""The job loop: the one place that wires reader -> scheduler -> engine -> job kind -> writer.

A job kind (``run``: sampling, ``score``: log-likelihoods, ...) says how an input item becomes scheduler
sequences, which logits a planned part needs, and what a step's outputs do to its sequences (sample a token,
add up log-probabilities); its finished sequences become records that the ``Emitter`` writes. The loop itself
reads the input ahead by a bounded window (the scheduler chooses among those: prefix-aware admission), admits,
plans and runs one engine step at a time, registers the prompt blocks each step completed in the prefix cache,
and hands the step's outputs to the kind. ``run_local`` is a whole local job around it: the output's lock and
journal, kernel warm-up, a progress bar, clean stops on SIGINT / SIGTERM, the final output and its summary.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, fields, replace
from typing import Iterator

from ..config import EngineConfig
from ..engine.engine import Engine
from ..engine.warmup import COMPILE_NOTICE, engine_kernels_cold, warm_up
from ..interrupt import StopSignals
from ..io import readers
from ..io.readers import BadRecord, count_records
from ..records import error_record
from ..scheduler import Part, Scheduler, Sequence
from .common import job_logger, meta_path, open_job, progress_bar, raise_if_stopped, threads


@dataclass
class ItemStats:
    """The counters of every kind of job (the loop, the summary and the Ray driver read them); a kind's stats
    subclass adds its own and tallies them from each good record in ``tally``."""
    items: int = 0
    ok: int = 0
    errors: int = 0
    skipped: int = 0          # finished by an earlier run (resume)

    def count(self, record: dict) -> None:
        """Tally one written output record."""
        if record["finish_reason"] == "error":
            self.errors += 1
            return
        self.ok += 1
        self.tally(record)

    def tally(self, record: dict) -> None:
        """The kind's own counts of a good record."""


class JobKind:
    """What a kind of job adds to the loop. A subclass is built as ``Kind(job, model, engine, sink)`` (``sink``:
    the output, what it holds already tells resume what to skip) and names its ``stats_class`` (an ``ItemStats``
    dataclass).

    The classmethods are what a job needs without a model: the Ray driver (``distributed.driver``) reads,
    resumes, counts and summarizes a job with them while its actors build the kind and run the loop."""
    stats_class: type
    config_class: type                      # the job configuration this kind runs

    def __init__(self, job, model, engine: Engine, sink):
        self.job, self.model, self.engine, self.sink = job, model, engine, sink
        self.stats = self.stats_class()
        self.tok = model.tokenizer
        self.emit = Emitter(sink, self.stats, postfix=self.postfix)
        self._t0 = time.perf_counter()

    # -- the loop's interface
    def items(self) -> Iterator:
        """The job's input items (and ``BadRecord`` stand-ins for unusable ones), in input order."""
        job = self.job
        return readers.read_items(list(job.inputs), self.record_spec(job), fmt=job.input_format)

    def start(self, item) -> list[Sequence]:
        """The sequences still to run for one input item; error records and resume skips go to the emitter."""
        raise NotImplementedError

    def settled(self, item) -> bool:
        """Counts ``item``; True when it needs no sequence: the output holds it already (a resume skip) or it is
        unusable (its error record is written). For kinds that write one record per item."""
        self.stats.items += 1
        if item.id in self.sink.done:
            self.emit.skip()
            return True
        if isinstance(item, BadRecord):
            self.emit.write(error_record(item.index, item.id, item.error))
            return True
        return False

    def want(self, part: Part):
        """Which logits of a planned part the kind needs: False, True (its last row's) or "all"."""
        raise NotImplementedError

    def wants(self, parts: list[Part]) -> list:
        """``want`` of every part of a step (``Engine.step``'s ``want`` values)."""
        return [self.want(p) for p in parts]

    def advance(self, sched: Scheduler, parts: list[Part], outs: list, t0: float, t1: float) -> None:
        """After a step (run from ``t0`` to ``t1``): use its outputs, retire finished sequences, emit records."""
        raise NotImplementedError

    # -- the job's interface around the loop (``run_local``, the Ray driver and its actors)
    @staticmethod
    def engine_for(model, config: EngineConfig) -> Engine:
        """The engine this kind of job runs on (it refuses a model the kind cannot use)."""
        return Engine(model, config)

    @classmethod
    def engine_config(cls, job) -> EngineConfig:
        """The configuration of the job's engine: ``job.engine``, with no argmax lm_head unless the kind asks for
        argmax rows (``RunKind``): its copy of the lm_head table would only take memory."""
        if job.engine.argmax_head == "auto":
            return replace(job.engine, argmax_head="off")
        return job.engine

    @staticmethod
    def kernels_cold(engine) -> bool:
        """Whether ``warm_up(engine)`` will compile (Numba's on-disk cache lacks its kernels): worth a word to the
        user before a minute of silence."""
        return engine_kernels_cold(engine)

    @staticmethod
    def warm_up(engine) -> float:
        """Compile (or load from cache) the kernels the job's steps use; seconds spent."""
        return warm_up(engine)

    @classmethod
    def record_spec(cls, job) -> readers.RecordSpec:
        """How one input record becomes the kind's item (the local reader and the Ray driver parse with it)."""
        raise NotImplementedError

    @classmethod
    def records_per_item(cls, job) -> int:
        """Output records an input item gives (at most: an item may override it)."""
        return 1

    @classmethod
    def partly_done(cls, job, item, sink) -> list | None:
        """For an item whose id the output holds: what of it is written when the item may still have more to
        run (the sample indices of a run item with n > 1), else None: it is done."""
        return None

    @classmethod
    def total(cls, job) -> int | None:
        """Output records the job will write (for the progress bar), or None when unknown."""
        n = count_records(list(job.inputs), job.input_format)
        return None if n is None else n * cls.records_per_item(job)

    def prepare(self) -> float:
        """Work to do before the first item that is compile time, not item time (seconds spent)."""
        return 0.0

    def postfix(self) -> dict | None:
        """Fields shown beside the progress bar."""
        return self.progress_fields(self.stats, time.perf_counter() - self._t0)

    @staticmethod
    def progress_fields(stats, seconds: float) -> dict | None:
        """Fields shown beside the progress bar after ``seconds`` of work that gave ``stats``."""
        return None

    def facts(self) -> dict:
        """What the summary needs to know of the model, as plain data (a Ray driver has no model: its actors
        report these)."""
        return {}

    @classmethod
    def summary(cls, job, stats, ctx: dict) -> dict:
        """The ``<output>.meta.json`` summary; ``ctx`` has output, fmt, files (the output's data files: the
        file, or a directory's part files), model (path, sha256, arch, name), load_s, compile_s, run_s, t_start,
        threads (Numba threads of an engine) and facts (``facts()``)."""
        raise NotImplementedError

    @classmethod
    def done_line(cls, job, stats, summary: dict) -> str:
        """The last line a job logs."""
        raise NotImplementedError


def uncounted(stats, records: list[dict]) -> dict:
    """The numeric counters of ``stats`` less what ``count`` tallies from ``records`` and less ``items``: what a
    run knows beyond its records (engine time, steps, resume skips, ...). A Ray actor returns these with a
    task's records; the driver counts the records as it writes them and adds these."""
    counted = type(stats)()
    for record in records:
        counted.count(record)
    return {f.name: getattr(stats, f.name) - getattr(counted, f.name) for f in fields(stats)
            if f.name != "items" and isinstance(getattr(stats, f.name), (int, float))}


class Emitter:
    """Where finished records go: written once to the output (a record the output already holds is counted in
    ``duplicates`` and dropped), tallied into the job's stats, and counted on the progress bar (with
    ``postfix()``'s fields). ``output`` is a sink or anything with ``lookup(index) -> sink`` (the Ray driver's
    part files). The local jobs, Ray actors' tasks and the Ray driver all write through one."""

    def __init__(self, output, stats, progress=None, postfix=lambda: None):
        self.lookup = output.lookup if hasattr(output, "lookup") else (lambda index: output)
        self.stats = stats
        self.progress = progress
        self.postfix = postfix
        self.duplicates = 0

    def write(self, record: dict) -> None:
        sink = self.lookup(record["index"])
        if sink.is_done(record["id"], record.get("sample_index")):
            self.duplicates += 1
            return
        sink.write(record)
        self.stats.count(record)
        if self.progress is not None:
            self.progress.update(1)
            fields = self.postfix()
            if fields:
                self.progress.set_postfix(fields, refresh=False)

    def skip(self, records: int = 1) -> None:
        """An input item the output already has (resume): ``records`` of them."""
        self.stats.skipped += 1
        if self.progress is not None:
            self.progress.update(records)

    def tick(self, records: int) -> None:
        """Records that will never be written (dedupe's dropped samples), counted as done on the bar."""
        if self.progress is not None:
            self.progress.update(records)


class CollectSink:
    """The slice of ``OutputSink`` a job uses, keeping the records in memory: what is done already (``done``: id ->
    index of items with something written; ``samples``: (id, sample_index) written) and the new records. A Ray
    actor's task (its items' resume state) and a job on records in memory (``bitnet_batch.api``: nothing done)."""

    def __init__(self, done: dict | None = None, samples: set | None = None):
        self.done = {} if done is None else done
        self._samples = set() if samples is None else samples
        self.records: list[dict] = []

    def is_done(self, record_id, sample_index: int | None = None) -> bool:
        if record_id not in self.done:
            return False
        return sample_index is None or (record_id, sample_index) in self._samples

    def write(self, record: dict) -> None:
        self.records.append(record)


def run_loop(kind: JobKind, engine: Engine, items, stop: StopSignals | None = None) -> None:
    """Run every item through the engine with continuous batching; returns early, after a whole step, once
    ``stop`` is requested."""
    sched = Scheduler(engine.kv, engine.config.max_batch, engine.max_rows)
    reader, exhausted = iter(items), False
    lookahead = 2 * engine.config.max_batch + 2      # the window admission chooses from
    while stop is None or not stop.requested:
        while not exhausted and len(sched.waiting) < lookahead:
            item = next(reader, None)
            if item is None:
                exhausted = True
                break
            for seq in kind.start(item):
                sched.add(seq)
        sched.admit()
        parts = sched.plan()
        if not parts:
            if exhausted and not sched.waiting and not sched.running:
                return
            continue
        t0 = time.perf_counter()
        outs = engine.step([(p.seq.slot, p.tokens, p.start, want) for p, want in zip(parts, kind.wants(parts))])
        t1 = time.perf_counter()
        sched.commit(parts)
        kind.advance(sched, parts, outs, t0, t1)


def run_local(job, kind_class: type[JobKind], *, model=None, quiet: bool = False, out=sys.stderr) -> dict:
    """A whole job of ``kind_class`` in this process; returns its summary (also in ``<output>.meta.json``).
    SIGINT / SIGTERM stop it after the current step with ``JobInterrupted``."""
    with StopSignals() as stop:
        log = job_logger(quiet, out)
        t_start = time.perf_counter()
        model, sha, sink = open_job(job, model, log)
        try:
            engine = kind_class.engine_for(model, kind_class.engine_config(job))
            kind = kind_class(job, model, engine, sink)
            if kind_class.kernels_cold(engine):
                log(f"{COMPILE_NOTICE} ...")
            compile_s = kind_class.warm_up(engine) + kind.prepare()
            log(f"kernels ready in {compile_s:.2f}s (JIT compile / cache load, not counted in item timings)")
            t_run = time.perf_counter()
            with progress_bar(lambda: kind_class.total(job), quiet, out) as progress:
                kind.emit.progress = progress
                run_loop(kind, engine, kind.items(), stop)
            run_s = time.perf_counter() - t_run
            raise_if_stopped(stop, sink, job)
            final = sink.finalize()
            summary = kind_class.summary(job, kind.stats, {
                "output": final, "fmt": sink.fmt, "files": [final], "load_s": model.load_s, "compile_s": compile_s,
                "run_s": run_s, "t_start": t_start, "threads": threads(), "facts": kind.facts(),
                "model": {"path": str(model.path), "sha256": sha, "arch": model.config.arch,
                          "name": model.config.name}})
            meta_path(final).write_text(json.dumps(summary, indent=2) + "\n")    # still under the output's lock
        finally:
            sink.close()
    log(kind_class.done_line(job, kind.stats, summary))
    return summary
