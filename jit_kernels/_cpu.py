"""Which kernel family runs here, decided once at import (shared by the ternary matmul and the lm_head).

``avx2``: LLVM-IR microkernels (Numba ``@intrinsic``) with AVX2 integer dots, FMA and F16C conversions;
chosen when the CPU Numba compiles for has all three (every AVX2 CPU in practice: Haswell, Zen and later)
and the JIT is on. ``portable``: plain Numba for any CPU (also under ``NUMBA_DISABLE_JIT``).
``BITNET_BATCH_KERNEL=auto|avx2|portable`` forces one.
"""
import os

from numba import config as numba_config
from numba.core.codegen import get_host_cpu_features

KERNEL_ENV = "BITNET_BATCH_KERNEL"
KERNEL_CHOICES = ("auto", "avx2", "portable")
AVX2_FEATURES = ("+avx2", "+fma", "+f16c")


def cpu_has_avx2() -> bool:
    """True when the CPU Numba compiles for has AVX2, FMA and F16C (mirrors Numba: ``NUMBA_CPU_FEATURES`` if
    set, else the host's features; ``NUMBA_ENABLE_AVX=0`` clears them)."""
    feats = numba_config.CPU_FEATURES if numba_config.CPU_FEATURES is not None else get_host_cpu_features()
    have = set(feats.split(","))
    return all(f in have for f in AVX2_FEATURES)


def select_kernel(choice: str, has_avx2: bool) -> str:
    """``choice`` is the value of ``BITNET_BATCH_KERNEL`` (``auto`` when unset) -> ``"avx2"`` or ``"portable"``."""
    choice = choice.strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    if choice == "avx2" and not has_avx2:
        raise ValueError(f"{KERNEL_ENV}=avx2 but the CPU Numba compiles for lacks AVX2/FMA/F16C (or "
                         f"NUMBA_DISABLE_JIT is set; NUMBA_CPU_FEATURES={numba_config.CPU_FEATURES!r}); "
                         f"use portable or auto")
    if choice == "auto":
        return "avx2" if has_avx2 else "portable"
    return choice


HAS_AVX2 = cpu_has_avx2() and not numba_config.DISABLE_JIT   # asked once: the feature query costs ~0.2 ms
KERNEL = select_kernel(os.environ.get(KERNEL_ENV, "auto"), HAS_AVX2)


def available_kernels() -> tuple:
    """Kernels that can run here (tests run each of them against the numpy twin)."""
    return ("avx2", "portable") if HAS_AVX2 else ("portable",)
