"""Gated GELU, tanh form (transformers ``gelu_pytorch_tanh``, ggml ``gelu``), for Gemma3's FFN:
``out = 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))) * u``, in float64, one row per task.

``activations.gated_activation`` holds relu^2 and SiLU for the BitNet models; this is a separate kernel so the
compiled BitNet layer (which dispatches on those two) is untouched."""
import numpy as np
from numba import njit, prange

from ._config import JIT, JIT_PARALLEL, serial

SQRT_2_OVER_PI = 0.7978845608028654      # sqrt(2 / pi)
GELU_COEF_A = 0.044715


def gelu_tanh_gated(g, u, out):
    """out[t, f] = gelu_tanh(g[t, f]) * u[t, f]; float64 [T, F] (out may alias g)."""
    if g.shape != u.shape or out.shape != g.shape or g.ndim != 2:
        raise ValueError(f"gelu_tanh_gated: shapes g {g.shape}, u {u.shape}, out {out.shape} differ")
    if g.dtype != np.float64 or u.dtype != np.float64 or out.dtype != np.float64:
        raise TypeError(f"gelu_tanh_gated: want float64, got {g.dtype}, {u.dtype}, {out.dtype}")
    if serial(g.size):
        _gelu_gated_serial(g, u, out)
    else:
        _gelu_gated(g, u, out)


@njit(inline="always", **JIT)
def _gelu_row(g, u, out, t):
    for f in range(g.shape[1]):
        a = g[t, f]
        out[t, f] = 0.5 * a * (1.0 + np.tanh(SQRT_2_OVER_PI * (a + GELU_COEF_A * a * a * a))) * u[t, f]


@njit(**JIT_PARALLEL)
def _gelu_gated(g, u, out):
    for t in prange(g.shape[0]):
        _gelu_row(g, u, out, t)


@njit(**JIT)
def _gelu_gated_serial(g, u, out):
    for t in range(g.shape[0]):
        _gelu_row(g, u, out, t)
