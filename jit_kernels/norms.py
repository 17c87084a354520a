"""RMSNorm: ``y = w * x / sqrt(mean(x^2) + eps)`` per row, computed in float64 whatever the storage type."""
import numpy as np
from numba import njit, prange

from ._config import JIT, JIT_PARALLEL, serial

_FLOATS = (np.float32, np.float64)


def rmsnorm(x, w, eps, out):
    """x float32/float64 [T, D]; w float32 [D]; out float32/float64 [T, D] (may alias x)."""
    if x.ndim != 2 or out.shape[0] < x.shape[0] or out.shape[1] != x.shape[1] or w.shape[0] != x.shape[1]:
        raise ValueError(f"rmsnorm: shapes x {x.shape}, w {w.shape}, out {out.shape} do not match")
    if x.dtype not in _FLOATS or out.dtype not in _FLOATS or w.dtype != np.float32:
        raise TypeError(f"rmsnorm: want float x/out and float32 w, got {x.dtype}, {out.dtype}, {w.dtype}")
    if serial(x.size):
        _rmsnorm_serial(x, w, np.float32(eps), out)
    else:
        _rmsnorm(x, w, np.float32(eps), out)


@njit(inline="always", **JIT)
def inv_rms(x, eps, t):
    """1 / sqrt(mean(x[t]^2) + eps) in float64 (shared with the fused norm + int8 quantizer in ``ternary``)."""
    D = x.shape[1]
    ss = 0.0
    for d in range(D):
        v = np.float64(x[t, d])
        ss += v * v
    return 1.0 / np.sqrt(ss / D + np.float64(eps))


@njit(inline="always", **JIT)
def _rmsnorm_row(x, w, eps, out, t):
    D = x.shape[1]
    r = inv_rms(x, eps, t)
    for d in range(D):
        out[t, d] = np.float64(w[d]) * (np.float64(x[t, d]) * r)


@njit(**JIT_PARALLEL)
def _rmsnorm(x, w, eps, out):
    for t in prange(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, t)


@njit(**JIT)
def _rmsnorm_serial(x, w, eps, out):
    for t in range(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, t)
