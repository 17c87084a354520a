"""Which kernel family runs here, decided once at import (shared by the ternary matmul and the lm_head).

``avx512``: the ``avx2`` family plus AVX-512 VNNI ternary tiles (``ternary_avx512``) and lm_head tiles that use
AVX-512's 32 vector registers; chosen when the CPU Numba compiles for has AVX-512 F/BW/VL/VNNI (Intel Ice Lake
and later servers, AMD Zen 4 and later). ``avx2``: LLVM-IR microkernels (Numba ``@intrinsic``) with AVX2 integer
dots, FMA and F16C conversions; chosen when the CPU has all three (every AVX2 CPU in practice: Haswell, Zen and
later). ``portable``: plain Numba for any CPU (also under ``NUMBA_DISABLE_JIT``). Both SIMD families need the
JIT. ``BITNET_BATCH_KERNEL=auto|amx|avx512|avx2|portable`` forces one; ``amx`` is named only to say that this
build has no AMX-INT8 kernel.
"""
import os

from numba import config as numba_config
from numba.core.codegen import get_host_cpu_features

KERNEL_ENV = "BITNET_BATCH_KERNEL"
KERNEL_CHOICES = ("auto", "amx", "avx512", "avx2", "portable")
FAMILIES = ("avx512", "avx2", "portable")       # the kernels this build has, fastest first
AVX2_FEATURES = ("+avx2", "+fma", "+f16c")
AVX512_FEATURES = AVX2_FEATURES + ("+avx512f", "+avx512bw", "+avx512vl", "+avx512vnni")
AMX_FEATURES = ("+amx-tile", "+amx-int8")
# the features each family's kernels emit instructions of (the portable one: plain IR for any CPU)
NEEDS = {"avx512": AVX512_FEATURES, "avx2": AVX2_FEATURES, "portable": ()}


def cpu_features() -> frozenset:
    """The features of the CPU Numba compiles for (mirrors Numba: ``NUMBA_CPU_FEATURES`` if set, else the host's
    features; ``NUMBA_ENABLE_AVX=0`` clears them), as LLVM names them: ``+avx2``, ``-amx-int8``, ..."""
    feats = numba_config.CPU_FEATURES if numba_config.CPU_FEATURES is not None else get_host_cpu_features()
    return frozenset(feats.split(","))


def runnable(features, jit: bool = True) -> tuple:
    """The families whose instructions ``features`` has, fastest first (only ``portable`` without the JIT)."""
    return tuple(k for k in FAMILIES if (jit or k == "portable") and all(f in features for f in NEEDS[k]))


def select_kernel(choice: str, available: tuple, has_amx: bool = False) -> str:
    """``choice`` is the value of ``BITNET_BATCH_KERNEL`` (``auto`` when unset), ``available`` what ``runnable``
    gives -> the family to run. A forced family the CPU lacks, ``amx`` and unknown names raise ValueError."""
    choice = choice.strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    if choice == "amx":
        cpu = "has AMX-INT8" if has_amx else "lacks AMX-INT8 too"
        raise ValueError(f"{KERNEL_ENV}=amx: this build has no AMX kernel (the CPU Numba compiles for {cpu}); use "
                         f"auto or one of {', '.join(available)}")
    if choice == "auto":
        return available[0]
    if choice not in available:
        raise ValueError(f"{KERNEL_ENV}={choice} but the CPU Numba compiles for lacks "
                         f"{'/'.join(f[1:].upper() for f in NEEDS[choice])} (or NUMBA_DISABLE_JIT is set; "
                         f"NUMBA_CPU_FEATURES={numba_config.CPU_FEATURES!r}); use auto or one of "
                         f"{', '.join(available)}")
    return choice


_FEATURES = cpu_features()          # asked once: the feature query costs ~0.2 ms
AVAILABLE = runnable(_FEATURES, jit=not numba_config.DISABLE_JIT)
HAS_AVX2 = "avx2" in AVAILABLE
HAS_AVX512 = "avx512" in AVAILABLE
# vdpbf16ps, for the opt-in bf16 lm_head (``lm_head_bf16``) of the avx512 family
HAS_AVX512_BF16 = HAS_AVX512 and "+avx512bf16" in _FEATURES
KERNEL = select_kernel(os.environ.get(KERNEL_ENV, "auto"), AVAILABLE, all(f in _FEATURES for f in AMX_FEATURES))


def check_kernel(name: str, kernel: str) -> str:
    """``kernel``, the family a kernel wrapper called ``name`` is to run (its module's ``KERNEL`` unless the caller
    named one: tests set that attribute to run another family), if this build has it and this CPU runs it; a
    ValueError naming the wrapper otherwise."""
    if kernel not in FAMILIES:
        raise ValueError(f"{name}: kernel must be one of {', '.join(FAMILIES)}, got {kernel!r}")
    if kernel not in AVAILABLE:
        raise ValueError(f"{name}: kernel {kernel!r} needs a CPU with {'/'.join(f[1:].upper() for f in NEEDS[kernel])} "
                         f"and the JIT (this one runs {', '.join(AVAILABLE)})")
    return kernel


def available_kernels() -> tuple:
    """Kernels that can run here, fastest first (tests run each of them against the numpy twin)."""
    return AVAILABLE


def kernel_id(kernel: str) -> int:
    """A family as the small integer the compiled layer takes (``layer.bitnet_layer``'s ``kernel``)."""
    return FAMILIES.index(kernel)
