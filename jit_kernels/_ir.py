"""LLVM-IR helpers shared by the intrinsic (``avx2``) microkernels: integer addresses, unaligned vector loads,
prefetches and intrinsic declarations; ``prefetch_row`` for plain jitted code."""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic, overload

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def const64(v):
    return ir.Constant(I64, v)


class Emit:
    """IR helpers for one microkernel body."""

    def __init__(self, builder):
        self.b = builder
        self.prefetch = self.declare("llvm.prefetch.p0", ir.VoidType(), [I8.as_pointer(), I32, I32, I32])

    def declare(self, name, ret, args):
        return cgutils.get_or_insert_function(self.b.module, ir.FunctionType(ret, args), name)

    def addr(self, base, stride, i, offset, const=0):
        """base + i * stride + offset + const (i, const: Python ints; the rest i64 values)."""
        b = self.b
        return b.add(b.add(base, b.mul(stride, const64(i))), b.add(offset, const64(const)))

    def load(self, address, vtype):
        return self.b.load(self.b.inttoptr(address, vtype.as_pointer()), align=1)

    def splat(self, value, n):
        """<n x type> of the scalar ``value``."""
        b = self.b
        one = b.insert_element(ir.Constant(ir.VectorType(value.type, 1), None), value, ir.Constant(I32, 0))
        return b.shuffle_vector(one, one, ir.Constant(ir.VectorType(I32, n), [0] * n))

    def prefetch_read(self, address):
        i32 = lambda v: ir.Constant(I32, v)  # noqa: E731
        self.b.call(self.prefetch, [self.b.inttoptr(address, I8.as_pointer()), i32(0), i32(3), i32(1)])

    def data_address(self, context, aryty, ary_value, row):
        """(address of row ``row`` of a 2-D array as i64, its row stride in bytes, its shape values)."""
        b = self.b
        a = context.make_array(aryty)(context, b, ary_value)
        stride = cgutils.unpack_tuple(b, a.strides)[0]
        base = b.add(b.ptrtoint(a.data, I64), b.mul(row, stride))
        return base, stride, cgutils.unpack_tuple(b, a.shape)


def prefetch_row(row):
    """Ask the CPU to bring the cache lines of a contiguous 1-D array view into cache (a hint; nothing to do
    without the JIT)."""


@intrinsic
def _prefetch_row(typingctx, row):
    if not (isinstance(row, types.Array) and row.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        e = Emit(builder)
        base = builder.ptrtoint(a.data, I64)
        nbytes = builder.mul(cgutils.unpack_tuple(builder, a.shape)[0], const64(context.get_abi_sizeof(
            context.get_data_type(sig.args[0].dtype))))
        with cgutils.for_range_slice(builder, const64(0), nbytes, const64(64)) as (off, _):
            e.prefetch_read(builder.add(base, off))
        return context.get_dummy_value()
    return types.void(row), codegen


@overload(prefetch_row, inline="always")
def _prefetch_row_impl(row):
    return lambda row: _prefetch_row(row)
