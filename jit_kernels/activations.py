"""Gated FFN activations: relu(g)^2 * u (BitNet b1.58) and silu(g) * u (llama.cpp's arch "bitnet")."""
import numpy as np
from numba import njit, prange

from ._config import JIT, JIT_PARALLEL, serial

RELU2 = 0
SILU = 1


def gated_activation(g, u, kind, out):
    """out[t, f] = act(g[t, f]) * u[t, f]; all float32 or all float64 [T, F]; kind RELU2 or SILU. out may alias g."""
    if g.shape != u.shape or out.shape != g.shape:
        raise ValueError(f"gated_activation: shapes g {g.shape}, u {u.shape}, out {out.shape} differ")
    if g.dtype != u.dtype or out.dtype != g.dtype:
        raise TypeError(f"gated_activation: dtypes differ: {g.dtype}, {u.dtype}, {out.dtype}")
    if kind not in (RELU2, SILU):
        raise ValueError(f"gated_activation: unknown kind {kind}")
    if serial(g.size):
        _gated_serial(g, u, kind, out)
    else:
        _gated(g, u, kind, out)


@njit(inline="always", **JIT)
def _gated_row(g, u, kind, out, t):
    F = g.shape[1]
    if kind == RELU2:
        for f in range(F):
            a = g[t, f]
            a = a if a > 0 else 0.0 * a
            out[t, f] = a * a * u[t, f]
    else:
        for f in range(F):
            a = g[t, f]
            out[t, f] = a / (1.0 + np.exp(-a)) * u[t, f]


@njit(**JIT_PARALLEL)
def _gated(g, u, kind, out):
    for t in prange(g.shape[0]):
        _gated_row(g, u, kind, out, t)


@njit(**JIT)
def _gated_serial(g, u, kind, out):
    for t in range(g.shape[0]):
        _gated_row(g, u, kind, out, t)
