"""Cache-line aligned buffers for the kernels' operands.

NumPy places a large array 16 bytes past a page boundary (its allocation header), so half of the 32-byte vector
loads at offsets 32j straddle two 64-byte cache lines. The AVX2 ternary tile reads its activations as memory
operands of ``vpmaddubsw`` (twice each, once per weight row of the tile); a straddling operand costs it ~25%
(T = 32, K = 2560, one thread). The engine allocates its packed weights, activations and KV caches here.
"""
import numpy as np

CACHE_LINE = 64


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose first element starts a cache line."""
    return _aligned(np.empty, shape, dtype)


def aligned_zeros(shape, dtype) -> np.ndarray:
    """``aligned_empty`` filled with zeros (from calloc'ed pages: untouched pages stay unmapped, as np.zeros)."""
    return _aligned(np.zeros, shape, dtype)


def _aligned(alloc, shape, dtype) -> np.ndarray:
    """A [shape] dtype view, starting a cache line, of a byte buffer from ``alloc`` one cache line longer."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = alloc(n + CACHE_LINE, np.uint8)
    start = -raw.ctypes.data % CACHE_LINE
    return raw[start:start + n].view(dtype).reshape(shape)
