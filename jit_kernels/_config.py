"""Compile flags for every kernel, in one place.

``JIT`` is for serial kernels, ``JIT_PARALLEL`` for kernels that use ``prange``.

- ``cache=True`` stores the compiled machine code in ``__pycache__`` so a second process starts in seconds
  (a fresh-process test proves it). ``BITNET_BATCH_JIT_CACHE=0`` turns it off. With a cold cache the runner
  compiles in a child process and loads the result (``bitnet_batch.engine.warmup.warm_up``).
- ``fastmath`` allows reassociation and FMA contraction only (no ``nnan``/``ninf``: masks use -inf). That
  lets LLVM vectorise float reductions. It stays deterministic: the reduction order is fixed when the kernel
  is compiled, and every kernel reduces along an inner axis whose length does not depend on the batch, so a
  row gives bit-identical results whatever batch or thread count it runs with. Never reduce across a
  ``prange`` axis.
"""
import contextlib
import os

CACHE = os.environ.get("BITNET_BATCH_JIT_CACHE", "1") != "0"
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
