"""A pool of engine actors that replaces dead ones and retries their unfinished tasks.

Every actor holds ``tasks_per_actor`` tasks at most (one running, the rest queued in Ray, so its engine never
waits for the driver). When a task's actor dies (killed, OOM, node lost) the actor is replaced by a new one in
the same slot and the task goes back to the front of the queue; after ``max_attempts`` deaths a task is split
into single items, and a single item that still kills its actor comes back as failed (the driver writes an
error record for it). Results come back whole, so an item's records are written once: by the first task
that returns it. Ray's own actor restarts and task retries are off: this pool does both, visibly.
"""
from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field

from ..errors import BitnetBatchError, ConfigError
from .worker import EngineWorker, raise_portable


@dataclass
class Task:
    """Items sent to one actor call: [(item, done_samples or None)] (``EngineWorker.run_task``)."""
    items: list
    attempts: int = 0               # calls of this task whose actor died


@dataclass
class _Slot:
    number: int
    generation: int                 # 0 for the first actor of the slot, +1 per replacement
    actor: object
    info_ref: object                # the actor's info() call: resolves when the model is loaded
    ready: bool = False
    inflight: int = 0


@dataclass
class PoolStats:
    restarts: int = 0               # actors replaced
    retried_tasks: int = 0          # task calls lost with their actor and sent again
    failed_items: int = 0           # items given up on (they killed max_attempts actors)
    actors: list = field(default_factory=list)      # info() of every actor that became ready


class ActorPool:
    def __init__(self, ray, job, kind, *, n_actors: int, threads: int, tasks_per_actor: int, max_attempts: int,
                 log=lambda msg: None):
        self.ray = ray
        self.job = job
        self.kind = kind                                # the job's JobKind class, built by every actor
        self.threads = threads
        self.tasks_per_actor = tasks_per_actor
        self.max_attempts = max_attempts
        self.log = log
        self.stats = PoolStats()
        self.sha256: str | None = None
        self._remote = ray.remote(EngineWorker)
        self._prefix = f"bitnet-batch-{uuid.uuid4().hex[:8]}"
        self._deaths_in_a_row = 0
        self._death_limit = 3 * n_actors + max_attempts
        self.queue: deque[Task] = deque()
        self.refs: dict = {}                            # task ObjectRef -> (slot, task)
        self.slots = [self._start(i, 0) for i in range(n_actors)]

    # ------------------------------------------------------------------------------------ actors
    def _start(self, number: int, generation: int) -> _Slot:
        actor = self._remote.options(
            num_cpus=self.threads, name=f"{self._prefix}-{number}-{generation}", scheduling_strategy="SPREAD",
            max_restarts=0, max_task_retries=0).remote(self.job, self.threads, self.kind)
        return _Slot(number, generation, actor, actor.info.remote())

    def wait_ready(self, timeout_s: float) -> dict:
        """Block until one actor has loaded the model; returns its info (raises its load error)."""
        deadline = _now() + timeout_s
        while not any(s.ready for s in self.slots):
            left = deadline - _now()
            if left <= 0:
                raise ConfigError(f"no engine actor started within {timeout_s:.0f}s: each needs {self.threads} "
                                  f"CPUs (--threads-per-actor) and the cluster has "
                                  f"{self.ray.cluster_resources().get('CPU', 0):g}")
            self.wait(timeout=min(left, 1.0))
        return self.stats.actors[0]

    def _on_ready(self, slot: _Slot) -> None:
        try:
            info = self.ray.get(slot.info_ref)
        except self.ray.exceptions.RayActorError as e:
            self._on_death(slot, e)
            return
        if info.get("error"):
            raise_portable(info["error"], f"engine actor on {info.get('host', '?')}")
        if self.sha256 is None:
            self.sha256 = info["sha256"]
        elif info["sha256"] != self.sha256:
            raise ConfigError(f"engine actor on {info['host']} loaded {info['path']} with sha256 {info['sha256']}, "
                              f"the first actor's has {self.sha256}: every node must see the same model file")
        slot.ready = True
        self.stats.actors.append({"slot": slot.number, "generation": slot.generation, **info})

    def _on_death(self, slot: _Slot, error: Exception) -> None:
        """Replace ``slot``'s actor, once per death (every task it held reports the same death)."""
        if self.slots[slot.number] is not slot:
            return
        self._deaths_in_a_row += 1
        if self._deaths_in_a_row > self._death_limit:
            raise BitnetBatchError(f"engine actors keep dying ({self._deaths_in_a_row} in a row without a finished "
                                   f"task); last: {_first_line(error)}")
        self.stats.restarts += 1
        self.log(f"engine actor {slot.number} died ({_first_line(error)}); starting a replacement")
        try:
            self.ray.kill(slot.actor, no_restart=True)   # unavailable is not always dead: make sure
        except Exception:
            pass
        self.slots[slot.number] = self._start(slot.number, slot.generation + 1)

    def shutdown(self) -> None:
        for slot in self.slots:
            try:
                self.ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass

    # ------------------------------------------------------------------------------------ tasks
    def wants_work(self) -> bool:
        """True when a ready actor has room for another task and nothing waits to be sent."""
        return not self.queue and self._free_slot() is not None

    def busy(self) -> bool:
        return bool(self.refs or self.queue)

    def put(self, task: Task) -> None:
        self.queue.append(task)
        self._pump()

    def _free_slot(self) -> _Slot | None:
        free = [s for s in self.slots if s.ready and s.inflight < self.tasks_per_actor]
        return min(free, key=lambda s: s.inflight) if free else None

    def _pump(self) -> None:
        while self.queue:
            slot = self._free_slot()
            if slot is None:
                return
            task = self.queue.popleft()
            self.refs[slot.actor.run_task.remote(task.items)] = (slot, task)
            slot.inflight += 1

    def wait(self, timeout: float) -> list[tuple[Task, dict]]:
        """Wait up to ``timeout`` s for a task result or an actor start; returns finished (task, result) pairs:
        ``result`` is the worker's dict, or ``{"failed": reason}`` for a single item given up on."""
        starting = {s.info_ref: s for s in self.slots if not s.ready}
        pending = list(self.refs) + list(starting)
        if not pending:
            return []
        ready, _ = self.ray.wait(pending, num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            if ref in starting:
                self._on_ready(starting[ref])
            else:
                out += self._on_result(ref)
        self._pump()
        return out

    def _on_result(self, ref) -> list[tuple[Task, dict]]:
        slot, task = self.refs.pop(ref)
        slot.inflight -= 1
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as e:
            self._on_death(slot, e)
            return self._retry(task, e)
        except self.ray.exceptions.RayTaskError as e:    # a bug in the worker: stop, with its traceback
            raise BitnetBatchError(f"engine actor failed: {e}") from e
        if result.get("error"):
            raise_portable(result["error"], "engine actor")
        self._deaths_in_a_row = 0
        return [(task, result)]

    def _retry(self, task: Task, error: Exception) -> list[tuple[Task, dict]]:
        """Send a task whose actor died again (first in line); split it, or give up on a single item."""
        task.attempts += 1
        self.stats.retried_tasks += 1
        if task.attempts < self.max_attempts:
            self.queue.appendleft(task)
        elif len(task.items) > 1:
            self.queue.extendleft(Task([item]) for item in reversed(task.items))
        else:
            self.stats.failed_items += 1
            return [(task, {"failed": f"the engine actor died {task.attempts} times while running this item "
                                      f"(last: {_first_line(error)})"})]
        return []


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _now() -> float:
    import time

    return time.monotonic()
