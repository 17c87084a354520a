"""Cache-line aligned buffers for the kernels' operands.

NumPy places a large array 16 bytes past a page boundary (its allocation header), so half of the 32-byte vector
loads at offsets 32j straddle two 64-byte cache lines. The AVX2 ternary tile reads its activations as memory
operands of ``vpmaddubsw`` (twice each, once per weight row of the tile); a straddling operand costs it ~25%
(T = 32, K = 2560, one thread). The engine allocates its packed weights, activations and KV caches here.
"""
import mmap

import numpy as np

CACHE_LINE = 64
_MMAP_BYTES = 1 << 20       # zeroed buffers from this size on are anonymous mappings of their own


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose first element starts a cache line."""
    return _aligned(np.empty, shape, dtype)


def aligned_zeros(shape, dtype) -> np.ndarray:
    """``aligned_empty`` filled with zeros whose untouched pages stay unmapped (cost no memory): a large one is
    an anonymous mapping of its own (page-aligned, unmapped when the array is freed). calloc gives that only
    while glibc's mmap threshold is below the size, and the threshold grows as large blocks are freed, so after
    enough churn (a 128k-token vocabulary freed, say) a 32 MB calloc comes from the heap and is zeroed page by
    page, resident at once."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if n < _MMAP_BYTES:
        return _aligned(np.zeros, shape, dtype)
    return np.frombuffer(mmap.mmap(-1, n), dtype=dtype).reshape(shape)


def _aligned(alloc, shape, dtype) -> np.ndarray:
    """A [shape] dtype view, starting a cache line, of a byte buffer from ``alloc`` one cache line longer."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = alloc(n + CACHE_LINE, np.uint8)
    start = -raw.ctypes.data % CACHE_LINE
    return raw[start:start + n].view(dtype).reshape(shape)
