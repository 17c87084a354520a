"""One engine per Ray actor: the model loaded once, Numba threads = the actor's CPUs, and the local job loop
over each task's items.

``EngineWorker`` is a plain class (wrapped with ``ray.remote`` by the driver, usable in-process in tests),
built for one job and its kind (``jobs.loop.JobKind``: ``RunKind``, ``ScoreKind``, ``EmbedKind``), whose engine
and warm-up it uses as ``run_local`` does. A task is a list of ``(item, done_samples)``: ``done_samples`` is
None for an item with nothing written yet, else the sample indices the output already holds (resume of a run
item with n > 1). The worker runs the items through the kind in ``jobs.loop.run_loop`` (the same planning,
seeding, sampling, error records, n / dedupe handling and timing as a local job) against a sink that collects
the records, and returns them; the driver writes them to the real output. Records therefore equal a local
job's, text for text and vector for vector. The engine (and so its prefix cache) lives as long as the actor.

Errors that must stop the job (a model that does not load, an option the engine rejects) are returned as
``{"error": ...}`` rather than raised, so they reach the driver with their type and are never mistaken for a
crashed actor (which the driver replaces and retries).
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import replace

from .. import errors
from ..errors import BitnetBatchError
from ..jobs.common import peak_rss_mb
from ..jobs.loop import CollectSink, JobKind, run_loop, uncounted


class EngineWorker:
    """A Ray actor's state: one model + engine, reused for every task it is given."""

    def __init__(self, job, threads: int, kind: type[JobKind]):
        self.threads = int(threads)
        self.kind = kind
        self.error: dict | None = None
        self.info_: dict = {"pid": os.getpid(), "host": socket.gethostname()}
        try:
            self._setup(job)
        except (BitnetBatchError, OSError) as e:
            self.error = portable_error(e)

    def _setup(self, job) -> None:
        import numba

        from jit_kernels._cpu import KERNEL

        from ..model.model import load_model

        self._set_threads()
        self.job = replace(job, engine=replace(job.engine, threads=self.threads))
        self.model = load_model(job.model, filename=job.model_file, ffn_act=job.ffn_act)
        self.engine = self.kind.engine_for(self.model, self.kind.engine_config(self.job))    # refuses a model the kind cannot use
        first = self.kind(self.job, self.model, self.engine, CollectSink())
        # the kernels, and the job grammar (kept by the tokenizer's compiler), once per actor
        compile_s = self.kind.warm_up(self.engine) + first.prepare()
        cfg = self.model.config
        self.info_.update(path=str(self.model.path), sha256=self.model.sha256(), arch=cfg.arch, name=cfg.name,
                          n_layer=cfg.n_layer, n_vocab=cfg.n_vocab, load_s=self.model.load_s, compile_s=compile_s,
                          threads=numba.get_num_threads(), kernel=KERNEL, facts=first.facts(),
                          columns=job.parquet_columns(self.model))

    def _set_threads(self) -> None:
        """Numba's thread count is per calling thread: set it wherever kernels will run."""
        import numba

        numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))

    def info(self) -> dict:
        """Model identity, start-up times, the kind's ``facts()`` and the output's typed Parquet columns (or the
        error that kept the model from loading)."""
        return {"error": self.error} if self.error else dict(self.info_)

    def run_task(self, items: list) -> dict:
        """Run every item of a task; returns its records, the job's counters that the records do not show
        (``jobs.loop.uncounted``) and the Numba threads used."""
        if self.error:
            return {"error": self.error}
        import numba

        self._set_threads()
        done, samples, todo = {}, set(), []
        for item, done_samples in items:
            todo.append(item)
            if done_samples is not None:
                done[item.id] = item.index
                samples.update((item.id, k) for k in done_samples)
        sink = CollectSink(done, samples)
        kind = self.kind(self.job, self.model, self.engine, sink)
        t0 = time.perf_counter()
        try:
            run_loop(kind, self.engine, todo)
        except BitnetBatchError as e:
            return {"error": portable_error(e)}
        run_s = time.perf_counter() - t0
        return {"records": sink.records, "stats": uncounted(kind.stats, sink.records), "run_s": run_s,
                "threads": numba.get_num_threads(), "pid": os.getpid(), "peak_rss_mb": round(peak_rss_mb(), 1)}


# ------------------------------------------------------------------------------------------ errors

def portable_error(e: Exception) -> dict:
    """An error as plain data (some of ours do not unpickle: ModelFormatError needs two arguments)."""
    out = {"type": type(e).__name__, "message": str(e)}
    if isinstance(e, errors.ModelFormatError):
        out.update(path=e.path, problem=e.problem, tensor=e.tensor)
    return out


def raise_portable(err: dict, where: str) -> None:
    """Raise the job-stopping error an actor reported, as its own type when it is one of ours."""
    kind = getattr(errors, err.get("type", ""), None)
    if kind is errors.ModelFormatError:
        raise errors.ModelFormatError(err["path"], err["problem"], tensor=err.get("tensor"))
    if isinstance(kind, type) and issubclass(kind, BitnetBatchError) and kind is not errors.InputError:
        raise kind(err["message"])
    if err.get("type") in ("FileNotFoundError", "PermissionError", "OSError"):
        raise OSError(f"{where}: {err['message']}")
    raise BitnetBatchError(f"{where}: {err.get('type')}: {err.get('message')}")
