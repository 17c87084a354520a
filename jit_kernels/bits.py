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


@intrinsic
def _bitcast_f64_u64(typingctx, v):
    if v != types.float64:
        return None
    return types.uint64(types.float64), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(64))


@intrinsic
def _bitcast_u64_f64(typingctx, b):
    if b != types.uint64:
        return None
    return types.float64(types.uint64), lambda context, builder, sig, args: builder.bitcast(args[0], ir.DoubleType())


@overload(f64_bits, inline="always")
def _f64_bits_impl(v):
    return lambda v: _bitcast_f64_u64(np.float64(v))


@overload(f64_from_bits, inline="always")
def _f64_from_bits_impl(b):
    return lambda b: _bitcast_u64_f64(np.uint64(b))


@intrinsic
def _bitcast_u32_f32(typingctx, b):
    if b != types.uint32:
        return None
    return types.float32(types.uint32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.FloatType())


@overload(f32_from_bits, inline="always")
def _f32_from_bits_impl(b):
    return lambda b: _bitcast_u32_f32(np.uint32(b))
