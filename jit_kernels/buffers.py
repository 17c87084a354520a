"""Cache-line aligned buffers for the kernels' operands.

NumPy places a large array 16 bytes past a page boundary (its allocation header), so half of the 32-byte vector
loads at offsets 32j straddle two 64-byte cache lines. The AVX2 ternary tile reads its activations as memory
operands of ``vpmaddubsw`` (twice each, once per weight row of the tile); a straddling operand costs it ~25%
(T = 32, K = 2560, one thread). The engine allocates its packed weights, activations and KV caches here.

``read_rows`` reads scattered rows of a table in a file into such a buffer (the argmax lm_head's candidates).
"""
import mmap

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ._config import JIT_PARALLEL
from ._ir import I8, I32, I64

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


# ---- rows of a file -------------------------------------------------------------------------------------------

def read_rows(fd: int, offset: int, rows, out) -> int:
    """out[i] <- the bytes of row rows[i] of a table of rows of ``out.shape[1] * out.itemsize`` bytes that starts at
    byte ``offset`` of the open file ``fd``, read with ``pread`` (both threads at once: a scattered row is a
    syscall and a 2-10 KB copy, ~2.5 us from a Python loop, ~1 us here). rows int64 [n]; out C-contiguous [>= n,
    width]. Returns how many rows came back short (0: all read)."""
    if rows.dtype != np.int64 or rows.ndim != 1 or out.ndim != 2 or out.shape[0] < rows.shape[0] \
            or not out.flags.c_contiguous or offset < 0 or fd < 0:
        raise ValueError(f"read_rows: rows {rows.shape} {rows.dtype}, out {out.shape} (C-contiguous: "
                         f"{out.flags.c_contiguous}), fd {fd}, offset {offset}")
    return _read_rows(fd, offset, out.shape[1] * out.itemsize, rows, out.reshape(-1).view(np.uint8))


@intrinsic
def _pread(typingctx, fd, address, nbytes, offset):
    """libc ``pread(fd, (void *) address, nbytes, offset)``, called by name (resolved in the process, like libm's
    functions, so a cached kernel that calls it loads in a fresh process)."""
    if not all(isinstance(a, types.Integer) for a in (fd, address, nbytes, offset)):
        return None
    sig = types.int64(fd, address, nbytes, offset)

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(I64, [I32, I8.as_pointer(), I64, I64])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "pread")
        fd_, addr, n, off = [context.cast(builder, v, t, types.int64) for v, t in zip(args, sig.args)]
        return builder.call(fn, [builder.trunc(fd_, I32), builder.inttoptr(addr, I8.as_pointer()), n, off])
    return sig, codegen


@njit(**JIT_PARALLEL)
def _read_rows(fd, offset, row_bytes, rows, flat):
    short = 0
    for i in prange(rows.shape[0]):
        got = _pread(fd, flat[i * row_bytes:].ctypes.data, row_bytes, offset + rows[i] * row_bytes)
        short += 0 if got == row_bytes else 1
    return short
