"""Which kernel family runs here, decided once at import (shared by the ternary matmul and the lm_head).

``amx``: the ``avx512`` family with AMX-INT8 tile products for steps of ``ternary_amx.AMX_MIN_ROWS`` token rows or
more, in the ternary matmul (``ternary_amx``) and the int8 screen of the argmax lm_head (``lm_head_int8``); chosen
when the CPU has AMX-TILE/INT8 besides AVX-512 VNNI (Intel Sapphire Rapids and later) and the OS lets the process
use the tile state (Linux: ``arch_prctl``, asked once at import, ``request_amx``). ``avx512``: the ``avx2``
family plus AVX-512 VNNI ternary tiles (``ternary_avx512``) and lm_head tiles that use AVX-512's 32 vector
registers; chosen when the CPU Numba compiles for has AVX-512 F/BW/VL/VNNI (Intel Ice Lake and later servers, AMD
Zen 4 and later). ``avx2``: LLVM-IR microkernels (Numba ``@intrinsic``) with AVX2 integer dots, FMA and F16C
conversions; chosen when the CPU has all three (every AVX2 CPU in practice: Haswell, Zen and later).
``portable``: plain Numba for any CPU (also under ``NUMBA_DISABLE_JIT``). The SIMD families need the JIT.
``BITNET_BATCH_KERNEL=auto|amx|avx512|avx2|portable`` forces one.
"""
import ctypes
import os
import platform
import sys

from numba import config as numba_config
from numba.core.codegen import get_host_cpu_features

KERNEL_ENV = "BITNET_BATCH_KERNEL"
KERNEL_CHOICES = ("auto", "amx", "avx512", "avx2", "portable")
FAMILIES = ("amx", "avx512", "avx2", "portable")       # the kernels this build has, fastest first
AVX2_FEATURES = ("+avx2", "+fma", "+f16c")
AVX512_FEATURES = AVX2_FEATURES + ("+avx512f", "+avx512bw", "+avx512vl", "+avx512vnni")
AMX_FEATURES = ("+amx-tile", "+amx-int8")
# the features each family's kernels emit instructions of (the portable one: plain IR for any CPU)
NEEDS = {"amx": AVX512_FEATURES + AMX_FEATURES, "avx512": AVX512_FEATURES, "avx2": AVX2_FEATURES, "portable": ()}
# Linux x86-64: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) lets the process use the AMX tile data
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


def cpu_features() -> frozenset:
    """The features of the CPU Numba compiles for (mirrors Numba: ``NUMBA_CPU_FEATURES`` if set, else the host's
    features; ``NUMBA_ENABLE_AVX=0`` clears them), as LLVM names them: ``+avx2``, ``-amx-int8``, ..."""
    feats = numba_config.CPU_FEATURES if numba_config.CPU_FEATURES is not None else get_host_cpu_features()
    return frozenset(feats.split(","))


def request_amx() -> str | None:
    """Ask the OS to let this process use the AMX tile state (every thread of it, from now on; asking again is
    harmless) -> None when granted, else why not. Linux (5.16 and later) grants it with ``arch_prctl``; before
    that, the first tile instruction would kill the process."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"AMX tile state is only requested on Linux x86-64 (this is {sys.platform} {platform.machine()})"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    except (OSError, AttributeError) as exc:
        return f"arch_prctl could not be called: {exc}"
    if rc != 0:
        err = ctypes.get_errno()
        return f"the kernel refused the AMX tile state (arch_prctl(ARCH_REQ_XCOMP_PERM): {os.strerror(err)})"
    return None


def runnable(features, jit: bool = True, amx_refused: str | None = None) -> tuple:
    """The families whose instructions ``features`` has, fastest first (only ``portable`` without the JIT);
    ``amx`` only where the OS granted the tile state (``amx_refused`` None)."""
    return tuple(k for k in FAMILIES if (jit or k == "portable") and all(f in features for f in NEEDS[k])
                 and (k != "amx" or amx_refused is None))


def select_kernel(choice: str, available: tuple, amx_refused: str | None = None) -> str:
    """``choice`` is the value of ``BITNET_BATCH_KERNEL`` (``auto`` when unset), ``available`` what ``runnable``
    gives (``amx_refused``: why the OS refused the tile state, if it did) -> the family to run. A forced family
    that cannot run here and unknown names raise ValueError."""
    choice = choice.strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return available[0]
    if choice not in available:
        if choice == "amx" and amx_refused is not None:
            raise ValueError(f"{KERNEL_ENV}=amx but {amx_refused}; use auto or one of {', '.join(available)}")
        raise ValueError(f"{KERNEL_ENV}={choice} but the CPU Numba compiles for lacks "
                         f"{'/'.join(f[1:].upper() for f in NEEDS[choice])} (or NUMBA_DISABLE_JIT is set; "
                         f"NUMBA_CPU_FEATURES={numba_config.CPU_FEATURES!r}); use auto or one of "
                         f"{', '.join(available)}")
    return choice


def simd_family(kernel: str) -> str:
    """The family of the kernels that have no AMX path (everything but the ternary matmul and the int8 screen):
    ``amx`` is ``avx512`` there."""
    return "avx512" if kernel == "amx" else kernel


_FEATURES = cpu_features()          # asked once: the feature query costs ~0.2 ms
_JIT = not numba_config.DISABLE_JIT
# the tile state is requested only where the AMX kernels would be compiled (their instructions need it)
AMX_REFUSED = request_amx() if _JIT and all(f in _FEATURES for f in NEEDS["amx"]) else None
AVAILABLE = runnable(_FEATURES, jit=_JIT, amx_refused=AMX_REFUSED)
# the AMX tiles are compiled where the CPU has the instructions (a CPU fact, part of Numba's cache key), whether
# or not this process may run them
HAS_AMX_INSTRUCTIONS = _JIT and all(f in _FEATURES for f in NEEDS["amx"])
HAS_AMX = "amx" in AVAILABLE
HAS_AVX2 = "avx2" in AVAILABLE
HAS_AVX512 = "avx512" in AVAILABLE
# vdpbf16ps, for the opt-in bf16 lm_head (``lm_head_bf16``) of the avx512 family
HAS_AVX512_BF16 = HAS_AVX512 and "+avx512bf16" in _FEATURES
KERNEL = select_kernel(os.environ.get(KERNEL_ENV, "auto"), AVAILABLE, AMX_REFUSED)


def check_kernel(name: str, kernel: str) -> str:
    """``kernel``, the family a kernel wrapper called ``name`` is to run (its module's ``KERNEL`` unless the caller
    named one: tests set that attribute to run another family), if this build has it and this CPU runs it; a
    ValueError naming the wrapper otherwise."""
    if kernel not in FAMILIES:
        raise ValueError(f"{name}: kernel must be one of {', '.join(FAMILIES)}, got {kernel!r}")
    if kernel not in AVAILABLE:
        raise ValueError(f"{name}: kernel {kernel!r} needs a CPU with {'/'.join(f[1:].upper() for f in NEEDS[kernel])} "
                         f"and the JIT{' and the OS tile state' if kernel == 'amx' else ''} (this one runs "
                         f"{', '.join(AVAILABLE)})")
    return kernel


def available_kernels() -> tuple:
    """Kernels that can run here, fastest first (tests run each of them against the numpy twin)."""
    return AVAILABLE


def kernel_id(kernel: str) -> int:
    """A family as the small integer the compiled layer takes (``layer.bitnet_layer``'s ``kernel``)."""
    return FAMILIES.index(kernel)
