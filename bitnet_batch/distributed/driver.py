"""``run_ray_job``: a job of any kind (``run``, ``score``, ``embed``) on a Ray cluster, with the local job's
records, resume and summary.

The driver (this process) reads the input shards with Ray Data and parses them with the kind's record spec,
skips what the output already holds, writes error records for bad rows itself, and sends tasks of good items
to the actor pool; every record an actor returns is written by the driver through the output's crash-safe
sink. What differs between kinds is asked of the kind's class (``jobs.loop.JobKind``: record spec, records
per item, partly done items, stats, summary). The summary is the local job's (``<output>.meta.json``), plus
``engine: "ray"`` and a ``ray`` section: actors, their threads, restarts and retried tasks.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..errors import BitnetBatchError, ConfigError, JobInterrupted
from ..interrupt import StopSignals
from ..io.readers import BadRecord, count_records
from ..io.writers import OutputLock
from ..jobs.common import meta_path, progress_bar
from ..jobs.loop import Emitter, JobKind
from ..jobs.run import RunKind
from ..records import error_record
from .config import RayConfig, import_ray
from .inputs import expand_inputs, parse_shards, read_shards
from .outputs import open_output
from .pool import ActorPool, Task


class WorkerCrashError(BitnetBatchError):
    """An item whose engine actor died every time it was tried (the type name of its error record)."""


class _Driver:
    """Reader -> tasks -> pool -> records -> output, with a local job's counters and writer (``Emitter``)."""

    def __init__(self, job, kind: type[JobKind], output, pool: ActorPool, task_size: int, progress=None):
        self.job, self.kind, self.output, self.pool, self.task_size = job, kind, output, pool, task_size
        self.per_item = kind.records_per_item(job)
        self.stats = kind.stats_class()
        self.emit = Emitter(output, self.stats, progress, postfix=self._postfix)
        self.by_actor: dict = {}        # pid -> {"tasks", "items", "run_s", "threads", "peak_rss_mb"}
        self._t0 = time.perf_counter()

    @property
    def duplicates(self) -> int:
        """Records that came back for an id already written (never expected)."""
        return self.emit.duplicates

    def _postfix(self) -> dict | None:
        return self.kind.progress_fields(self.stats, time.perf_counter() - self._t0)

    def run(self, items, stop=None) -> None:
        """Send every item to the actors and write what comes back; returns early once ``stop`` is requested
        (records of tasks still out are not waited for: a rerun generates them)."""
        reader, exhausted = iter(items), False
        while stop is None or not stop.requested:
            while not exhausted and self.pool.wants_work():
                task = self._next_task(reader)
                if task is None:
                    exhausted = True
                else:
                    self.pool.put(task)
            if exhausted and not self.pool.busy():
                return
            for task, result in self.pool.wait(timeout=1.0):
                self._collect(task, result)

    def _next_task(self, reader) -> Task | None:
        """Up to ``task_size`` items that still need the model; bad rows and finished ids are handled here."""
        todo = []
        while len(todo) < self.task_size:
            item = next(reader, None)
            if item is None:
                break
            self.stats.items += 1
            sink = self.output.lookup(item.index)
            if isinstance(item, BadRecord):
                if item.id in sink.done:
                    self.emit.skip(self.per_item)
                else:
                    self.emit.write(error_record(item.index, item.id, item.error))
            elif item.id not in sink.done:
                todo.append((item, None))
            else:                           # in the output: whole, or some of its n > 1 samples
                written = self.kind.partly_done(self.job, item, sink)
                if written is None:
                    self.emit.skip(self.per_item)       # written by an earlier run
                else:                               # the actor's kind decides which samples are left
                    todo.append((item, written))
            if todo and todo[-1][0] is item:
                self.output.started(item.index)
            self.output.seal(item.index + 1)
        return Task(todo) if todo else None

    def _collect(self, task: Task, result: dict) -> None:
        if "failed" in result:
            for item, _ in task.items:
                self.emit.write(error_record(item.index, item.id,
                                             WorkerCrashError(f"{item.location}: {result['failed']}")))
        else:
            for record in result["records"]:
                self.emit.write(record)
            for name, value in result["stats"].items():     # what the records do not show: engine time, steps
                setattr(self.stats, name, getattr(self.stats, name) + value)
            self._account(task, result)
        for item, _ in task.items:
            self.output.returned(item.index)

    def _account(self, task: Task, result: dict) -> None:
        actor = self.by_actor.setdefault(result["pid"], {"tasks": 0, "items": 0, "run_s": 0.0, "threads": set()})
        actor["tasks"] += 1
        actor["items"] += len(task.items)
        actor["run_s"] += result["run_s"]
        actor["threads"].add(result["threads"])
        actor["peak_rss_mb"] = result["peak_rss_mb"]


# ---------------------------------------------------------------------------------------------- the job

def run_ray_job(job, ray_config: RayConfig | None = None, *, kind: type[JobKind] | None = None,
                quiet: bool = False, out=sys.stderr) -> dict:
    """Run ``job`` (a ``JobConfig``, ``ScoreJobConfig`` or ``EmbedJobConfig``; ``kind``: its JobKind class, by
    default the one whose ``config_class`` it is) on Ray (connecting to ``ray_config.address``, or the Ray
    already initialized in this process); returns the summary, also written to ``<output>.meta.json``. The
    driver holds the output's lock from before Ray starts until the summary is written."""
    kind = kind or _kind_of(job)
    if not isinstance(job, kind.config_class):
        raise ConfigError(f"run_ray_job: {kind.__name__} runs a {kind.config_class.__name__}, not a "
                          f"{type(job).__name__}")
    lock = OutputLock(job.output)       # first: a second job on this output stops here, having touched nothing
    try:
        return _run_ray_job(job, kind, ray_config or RayConfig(), lock, quiet, out)
    finally:
        lock.release()


def _kind_of(job) -> type[JobKind]:
    from ..jobs.embed import EmbedKind
    from ..jobs.score import ScoreKind

    for kind in (RunKind, ScoreKind, EmbedKind):
        if isinstance(job, kind.config_class):
            return kind
    raise ConfigError(f"run_ray_job: {type(job).__name__} is not a job configuration")


def _run_ray_job(job, kind: type[JobKind], cfg: RayConfig, lock: OutputLock, quiet: bool, out) -> dict:
    ray = import_ray()

    def log(msg):
        if not quiet:
            print(msg, file=out, flush=True)

    t_start = time.perf_counter()
    if Path(job.model).exists():        # actors do not share the driver's working directory on other nodes
        job = replace(job, model=str(Path(job.model).resolve()))
    shards = expand_inputs(job.inputs, job.input_format)      # missing / unreadable inputs fail before Ray starts
    spec = kind.record_spec(job)
    started_ray = _connect(ray, cfg, quiet)
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    data_logger.setLevel(logging.ERROR)     # Ray Data's per-dataset INFO lines would tear the progress bar
    pool = output = None
    try:
        threads, n_actors = _plan_actors(ray, cfg)
        job = replace(job, engine=replace(job.engine, threads=threads))
        log(f"ray: {n_actors} engine actors x {threads} CPUs (Numba threads) on "
            f"{ray.cluster_resources().get('CPU', 0):g} cluster CPUs")
        pool = ActorPool(ray, job, kind, n_actors=n_actors, threads=threads, tasks_per_actor=cfg.tasks_per_actor,
                         max_attempts=cfg.max_attempts, log=log)
        info = pool.wait_ready(cfg.startup_timeout_s)
        log(f"model: {info['path']} ({info['arch']}, {info['n_layer']} layers, vocab {info['n_vocab']}) loaded in "
            f"{info['load_s']:.2f}s, kernels ready in {info['compile_s']:.2f}s (first actor, on {info['host']})")
        output = open_output(job, job.fingerprint(info["sha256"]), info["name"] or os.path.basename(info["path"]),
                             cfg.rows_per_part, lock=lock, columns=info["columns"])
        t_run = time.perf_counter()
        with progress_bar(lambda: _total(job, kind, shards), quiet, out) as progress, StopSignals() as stop:
            driver = _Driver(job, kind, output, pool, cfg.task_size(job.engine.max_batch), progress)
            driver.run(parse_shards(read_shards(ray, shards, pin_local=not _is_client(cfg)), shards, spec), stop)
        run_s = time.perf_counter() - t_run
        if stop.requested:
            s = driver.stats
            raise JobInterrupted(stop.signum, s.ok + s.errors + s.skipped, _total(job, kind, shards))
        final = output.finalize()
        summary = _summary(job, cfg, info, driver, pool, output, final, n_actors, threads, run_s, t_start)
        meta_path(final).write_text(json.dumps(summary, indent=2) + "\n")      # still under the output's lock
    finally:
        data_logger.setLevel(saved_level)
        if output is not None:
            output.close()
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()
    log(f"ray: {n_actors} actors, {pool.stats.restarts} replaced, {pool.stats.retried_tasks} tasks retried")
    log(kind.done_line(job, driver.stats, summary))
    return summary


def _connect(ray, cfg: RayConfig, quiet: bool) -> bool:
    """Join the cluster at ``cfg.address`` (or start a local Ray); False when this process already had Ray."""
    if ray.is_initialized():
        return False
    kwargs = {"address": cfg.address, "log_to_driver": not quiet,
              "logging_level": logging.WARNING if quiet else logging.INFO}
    if cfg.address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False         # a private local instance
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot connect to Ray at {cfg.address or 'a new local instance'}: {e}") from e
    return True


def _is_client(cfg: RayConfig) -> bool:
    """A Ray Client driver (ray://) runs on no cluster node."""
    return (cfg.address or os.environ.get("RAY_ADDRESS", "")).startswith("ray://")


def _plan_actors(ray, cfg: RayConfig) -> tuple[int, int]:
    """(CPUs = Numba threads per actor, actors): as given, else one actor per node using its CPUs."""
    cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    cpus = [c for c in cpus if c > 0] or [1]
    threads = cfg.threads_per_actor or min(cpus)
    actors = cfg.actors or max(1, sum(c // threads for c in cpus))
    return threads, actors


def _total(job, kind: type[JobKind], shards) -> int | None:
    """Output records the job will write, when the inputs are local files (counting remote ones means reading
    them twice)."""
    if not all(s.is_local for s in shards):
        return None
    n = count_records([s.uri for s in shards], job.input_format)
    return None if n is None else n * kind.records_per_item(job)


def _summary(job, cfg, info, driver, pool, output, final, n_actors, threads, run_s, t_start) -> dict:
    """The local job's summary, plus ``engine`` and ``ray``."""
    ctx = {"output": final, "fmt": output.fmt, "files": output.files(final), "load_s": info["load_s"],
           "compile_s": info["compile_s"], "run_s": run_s, "t_start": t_start, "threads": threads,
           "facts": info["facts"], "model": {k: info[k] for k in ("path", "sha256", "arch", "name")}}
    summary = driver.kind.summary(job, driver.stats, ctx)
    summary["engine"] = "ray"
    summary["kernel"] = info["kernel"]            # the actors' kernel family (the first actor's), not the driver's
    summary["ray"] = {
        "address": cfg.address, "actors": n_actors, "threads_per_actor": threads, "task_size": driver.task_size,
        "restarts": pool.stats.restarts, "retried_tasks": pool.stats.retried_tasks,
        "failed_items": pool.stats.failed_items, "duplicate_records": driver.duplicates,
        "actor_starts": [{k: a.get(k) for k in ("slot", "generation", "host", "pid", "load_s", "compile_s",
                                                "threads", "kernel")} for a in pool.stats.actors],
        "actor_work": [{"pid": pid, **w, "threads": sorted(w["threads"])}
                       for pid, w in sorted(driver.by_actor.items())]}
    return summary
