"""``RayConfig``: where and how a job runs on a Ray cluster (``bitnet-batch run | score | embed ... --engine ray``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class RayConfig:
    """Options of a Ray job. Zero means "derive it from the cluster" where noted."""
    address: str | None = None      # None: RAY_ADDRESS or a new local instance; "auto"; "HOST:PORT"; "ray://..."
    actors: int = 0                 # engine actors; 0: as many as the cluster's CPUs hold at threads_per_actor
    threads_per_actor: int = 0      # CPUs reserved per actor = its Numba threads; 0: the smallest node's CPUs
    items_per_task: int = 0         # input items per actor call; 0: 4 x max_batch (a call ends with a short
                                    # drain, so bigger calls batch better, smaller ones retry less on a crash)
    tasks_per_actor: int = 2        # calls queued on each actor, so its engine never waits for the driver
    max_attempts: int = 3           # tries of a call whose actor died; then it is split into single items,
                                    # and a single item that kills its actor this often becomes an error record
    rows_per_part: int = 10_000     # input items per part file when the output is a directory
    startup_timeout_s: float = 900.0    # longest wait for the first actor (model download, kernel compile)

    def __post_init__(self):
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise ConfigError(f"ray address must be 'auto', HOST:PORT or ray://HOST:PORT, got {self.address!r}")
        for name, low in (("actors", 0), ("threads_per_actor", 0), ("items_per_task", 0), ("tasks_per_actor", 1),
                          ("max_attempts", 1), ("rows_per_part", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.startup_timeout_s, (int, float)) or not self.startup_timeout_s > 0:
            raise ConfigError(f"startup_timeout_s must be a number > 0, got {self.startup_timeout_s!r}")

    def task_size(self, max_batch: int) -> int:
        """Items per actor call."""
        return self.items_per_task or max(4 * max_batch, 8)


def import_ray():
    """The ``ray`` module, or a ConfigError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra: inputs are read with Ray Data)
    except ImportError as e:
        raise ConfigError(f"--engine ray needs Ray with Ray Data: pip install 'bitnet-batch[ray]' ({e})") from None
    return ray
