"""Compile flags for every kernel, in one place.

``JIT`` is for serial kernels, ``JIT_PARALLEL`` for kernels that use ``prange``.

- ``cache=True`` stores the compiled machine code in ``__pycache__`` so a second process starts in seconds
  (a fresh-process test proves it). ``BITNET_BATCH_JIT_CACHE=0`` turns it off. With a cold cache the runner
  compiles in a child process and loads the result (``bitnet_batch.engine.warmup.warm_up``). Numba checks a
  cached function against its own file only, but a compiled caller holds its callees' code (the layer holds
  the matmul tiles of ``ternary*.py``): so this package's cache is dropped whenever any of its source files
  changes (``drop_stale_cache``, on import), and an update never runs old kernels.
- ``fastmath`` allows reassociation and FMA contraction only (no ``nnan``/``ninf``: masks use -inf). That
  lets LLVM vectorise float reductions. It stays deterministic: the reduction order is fixed when the kernel
  is compiled, and every kernel reduces along an inner axis whose length does not depend on the batch, so a
  row gives bit-identical results whatever batch or thread count it runs with. Never reduce across a
  ``prange`` axis.
"""
import contextlib
import hashlib
import os
from pathlib import Path

CACHE = os.environ.get("BITNET_BATCH_JIT_CACHE", "1") != "0"
SOURCES_STAMP = "jit_kernels.sources"      # in the cache directory: the digest of the sources it was built from
FASTMATH = {"reassoc", "contract", "nsz"}

JIT = dict(nogil=True, cache=CACHE, fastmath=FASTMATH, boundscheck=False)
JIT_PARALLEL = dict(JIT, parallel=True)

# Kernels that must keep their written order of float operations wherever they are inlined (the intrinsic
# microkernels emit plain IEEE instructions; Numba's fastmath pass would add flags to them): no fastmath, and
# error_model numpy (x / 0 gives inf).
JIT_EXACT = dict(JIT, fastmath=False, error_model="numpy")
JIT_EXACT_PARALLEL = dict(JIT_PARALLEL, fastmath=False, error_model="numpy")
# Polynomial kernels whose range reduction must not be reassociated (Cody-Waite: x - n*ln2_hi - n*ln2_lo folded
# into x - n*ln2 loses up to 4 ulp), but may fuse a multiply and an add into one FMA (no extra rounding); error
# model numpy, so a division has no zero check (which would keep the loop from vectorising).
JIT_CONTRACT = dict(JIT, fastmath={"contract"}, error_model="numpy")

# Row-wise kernels (norms, RoPE, KV writes, activations, int8 quantization) run serially up to this many
# elements: a decode step's few rows take microseconds, less than waking the thread pool (which costs far more
# when the other core is busy). The row body is one inlined function in both drivers, so a row's result does
# not depend on which driver ran it.
SERIAL_MAX = 1 << 17
_serial_limit = [SERIAL_MAX]


def serial_max() -> int:
    """The current serial limit (``SERIAL_MAX``, or -1 inside ``parallel_drivers``), for compiled callers."""
    return _serial_limit[0]


def serial(n_elements: int) -> bool:
    """True when a row-wise kernel over ``n_elements`` should take its serial driver."""
    return n_elements <= _serial_limit[0]


@contextlib.contextmanager
def parallel_drivers():
    """Row-wise kernels take their parallel driver whatever the size, inside this block: a warm-up runs a tiny
    step in it so the parallel drivers are compiled (or loaded from the cache) before anything is timed."""
    saved = _serial_limit[0]
    _serial_limit[0] = -1
    try:
        yield
    finally:
        _serial_limit[0] = saved


# ------------------------------------------------------------------------------------ the on-disk cache

def sources_digest() -> str:
    """sha256 over this package's source files (names and contents)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def cache_dir() -> Path | None:
    """The directory Numba caches this package's kernels in, found with Numba's own locators in its order (a
    private API: None on any surprise)."""
    try:
        from numba.core.caching import CacheImpl

        def probe():
            pass
        for locator in CacheImpl._locator_classes:
            found = locator.from_function(probe, __file__)
            if found is not None:
                return Path(found.get_cache_path())
    except Exception:         # noqa: BLE001 - another Numba: no guard, as before
        return None
    return None


def drop_stale_cache(directory: Path, digest: str) -> bool:
    """Delete the compiled kernels (``*.nbi``, ``*.nbc``) in ``directory`` unless its stamp says they were built
    from sources with ``digest``, then stamp it; True when it dropped them. Another process that loses the race
    for a file just compiles that kernel again."""
    stamp = directory / SOURCES_STAMP
    try:
        if stamp.read_text() == digest:
            return False
    except OSError:
        pass
    for pattern in ("*.nbi", "*.nbc"):
        for path in directory.glob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()
    with contextlib.suppress(OSError):
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{SOURCES_STAMP}.{os.getpid()}.tmp"
        tmp.write_text(digest)
        os.replace(tmp, stamp)
    return True


if CACHE:
    _dir = cache_dir()
    if _dir is not None:
        drop_stale_cache(_dir, sources_digest())
