"""Numba kernels of bitnet-batch. Imports only numpy and numba.

Each module has public wrappers that check shapes and dtypes and private ``@njit`` kernels that only do
arithmetic on buffers passed in. Compile flags live in :mod:`jit_kernels._config`.
"""
