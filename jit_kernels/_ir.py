"""LLVM-IR helpers shared by the intrinsic (``avx2``) microkernels: integer addresses, unaligned vector loads,
prefetches and intrinsic declarations."""
from llvmlite import ir
from numba.core import cgutils

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
