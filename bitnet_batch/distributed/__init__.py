"""Jobs of every kind on a Ray cluster (``bitnet-batch run | score | embed ... --engine ray``; needs
``pip install 'bitnet-batch[ray]'``).

``config`` (RayConfig), ``inputs`` (shards read by Ray Data, parsed like the local reader), ``worker`` (one
engine per actor), ``pool`` (actors replaced and tasks retried when they die), ``outputs`` (one file or part
files through ``OutputSink``), ``driver`` (``run_ray_job``). Importing this package does not import Ray.
"""
from .config import RayConfig
from .driver import WorkerCrashError, run_ray_job

__all__ = ["RayConfig", "WorkerCrashError", "run_ray_job"]
