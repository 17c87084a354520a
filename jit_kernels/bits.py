"""Bit casts between float64 and uint64, and from uint32 to float32, for jitted code (``x.view`` of a
scalar), usable under ``NUMBA_DISABLE_JIT`` too (the plain functions run then).

They let a loop reduce float magnitudes as integers: for finite values, ``f64_bits(v) & F64_ABS_MASK`` orders
as ``abs(v)`` does, and an integer max reduction vectorises where LLVM leaves a float max scalar (it would need
no-NaN fast-math); ``f32_from_bits`` builds powers of two from their exponent bits in a vectorised exp."""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic, overload

F64_ABS_MASK = np.uint64(0x7FFFFFFFFFFFFFFF)


def f64_bits(v):
    """The IEEE bits of float64(v) as uint64."""
    return np.float64(v).view(np.uint64)


def f64_from_bits(b):
    """The float64 whose IEEE bits are the uint64 b."""
    return np.uint64(b).view(np.float64)


def f32_from_bits(b):
    """The float32 whose IEEE bits are the uint32 b."""
    return np.uint32(b).view(np.float32)


def _jit_bit_cast(py_func, src, dst, dst_ir, src_np):
    """Give ``py_func`` (a plain bit cast of a ``src`` scalar) a jitted body: an intrinsic that reinterprets the
    value's bits as ``dst`` (an LLVM bitcast), after converting the argument to ``src_np``."""
    @intrinsic
    def cast(typingctx, v):
        if v != src:
            return None
        return dst(src), lambda context, builder, sig, args: builder.bitcast(args[0], dst_ir)

    @overload(py_func, inline="always")
    def _impl(v):
        return lambda v: cast(src_np(v))


_jit_bit_cast(f64_bits, types.float64, types.uint64, ir.IntType(64), np.float64)
_jit_bit_cast(f64_from_bits, types.uint64, types.float64, ir.DoubleType(), np.uint64)
_jit_bit_cast(f32_from_bits, types.uint32, types.float32, ir.FloatType(), np.uint32)
