"""Numba kernels of bitnet-batch. Imports only numpy and numba.

Each module has public wrappers that check shapes and dtypes and private ``@njit`` kernels that only do
arithmetic on buffers passed in. Compile flags live in :mod:`jit_kernels._config`.
"""

# ``ternary`` first, whatever module is asked for: the avx512 and amx matmul modules build on it and it imports
# them at its end (entered through one of them, the cycle would find it half-built)
from . import ternary  # noqa: E402,F401
