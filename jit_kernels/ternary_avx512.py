"""The ``avx512`` ternary matmul: AVX-512 VNNI tiles over ``ternary``'s weight layout, the same integer dots and
float epilogue as the AVX2 kernel, so the same bits (``ternary`` has the layout, the math and the wrapper).

``vpdpbusd`` multiplies 64 unsigned bytes by 64 signed bytes and adds each 4 consecutive products into an int32
lane of the accumulator: one instruction does what ``vpmaddubsw`` + ``vpaddw`` (+ ``vpmaddwd`` widening every
``I16_BLOCKS`` blocks) do twice over in the AVX2 tile, and the int32 lanes cannot overflow (|dot| <= 384 K < 2^30
for K <= MAX_K), so there is no int16 stage. One 64-byte load holds block b of both rows of a row group (bytes
64b .. 64b + 63); a 16-bit shift and the mask 0x0303 give the codes of input group j (inputs 32j .. 32j + 31 of
the block) for both rows, and the 32 activations of group j, broadcast to both 256-bit halves (one
``vbroadcasti64x4`` load), are the signed operand. Accumulator lanes 0-7 sum row 2g's products, lanes 8-15 row
2g + 1's; the tile ends in one vector epilogue per token row (``_emit_epilogue_rows``), the same IEEE operations
as ``ternary``'s.

Tiles: ``GROUPS`` = 4 row groups (8 weight rows) x C <= 4 token rows, 16 zmm accumulators, the block loop in
one inline-assembly statement (``_emit_dots_asm``), prefetching each group's stream ``PREFETCH_GROUPS`` bytes
ahead; the AVX2 tiles for a task's last rows when they are not a multiple of 8. One token row (decode) takes a
one-group tile in IR on 256-bit halves (``_emit_dots_one_token``) that prefetches ``PREFETCH_T1`` bytes ahead,
like the AVX2 one-token tile.

On Zen 4, ``vpdpbusd`` on zmm issues once per cycle (64 MACs) and ``vpmaddubsw`` on ymm twice (also 64), so the
gain there is the instructions saved around the multiplies: one thread, T = 32, 2B4T shapes, 195-225 against
149-155 GMAC/s (``scripts/bench_kernels.py``); Intel cores since Ice Lake issue 512-bit ``vpdpbusd`` twice per
cycle. Compiled only on CPUs with AVX-512 F/BW/VL/VNNI (``_cpu.HAS_AVX512``).
"""
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils

from ._config import JIT_EXACT, JIT_EXACT_PARALLEL
from ._ir import I8, I16, I32, I64, const64
from .ternary import (BLOCK, BLOCK_BYTES, GROUP_BYTES, PREFETCH_T1, ROW_GROUP, TASK_ROWS, _emit_epilogue, _Emit,
                      _epilogue_operands, _row_pairs_avx2, _tile_operands, odd_row, tile_intrinsic)

GROUPS = 4           # row groups per tile of the batched kernel
# bytes ahead in each row group's stream that the batched tiles prefetch: 4 streams per tile want more in flight
# than the AVX2 tile's one (``ternary.PREFETCH``, 2048): weights from DRAM (one thread, 2B4T shapes), T = 4
# 25-35% less time than at 2048, T = 8 ~15%, T = 32 ~5%; 8192 measured the same as 4096
PREFETCH_GROUPS = 4096

_V16I32, _V8I32, _V16I16, _V32I8 = (ir.VectorType(I32, 16), ir.VectorType(I32, 8), ir.VectorType(I16, 16),
                                    ir.VectorType(I8, 32))


class _Emit512(_Emit):
    """``ternary._Emit`` plus ``vpdpbusd`` on ymm (AVX-512VL; the zmm form is in ``_emit_dots_asm``)."""

    def __init__(self, builder):
        super().__init__(builder)
        self.dpbusd256 = self.declare("llvm.x86.avx512.vpdpbusd.256", _V8I32, [_V8I32] * 3)


def _emit_dots_one_token(e, group, xp, xstride, nblk, prefetch):
    """IR: the dots of the two rows of a row group with one token row over nblk blocks -> [row 0's, row 1's]
    <8 x i32> lane vectors. Memory bound (decode), so in 256-bit halves: each row's 32 code bytes and each input
    group's 32 activations are one ymm load, and ``vpdpbusd`` on ymm. The same loop on zmm (one 64-byte load per
    block, activations broadcast) was 3-15% slower than the AVX2 one-token tile with the weights streamed from
    DRAM by 2 threads; this one is 9-22% faster. Each row sums its 4 input groups in 4 accumulators (one would
    chain its 4 ``vpdpbusd`` per block on their latency), added at the end (integer adds: any order gives the
    same value)."""
    b = e.b
    zero = ir.Constant(_V8I32, None)
    # accumulators [r][j]: allocas in the entry block, which SROA turns into registers
    slots = [[cgutils.alloca_once_value(b, zero) for _ in range(4)] for _ in range(ROW_GROUP)]
    mask = ir.Constant(_V16I16, [0x0303] * 16)
    with cgutils.for_range_slice(b, const64(0), nblk, const64(1)) as (blk, _):
        wofs = b.mul(blk, const64(GROUP_BYTES))
        xofs = b.mul(blk, const64(BLOCK))
        e.prefetch_read(b.add(b.add(group, wofs), const64(prefetch)))
        # block b of row r: the 32 bytes at group + GROUP_BYTES * b + BLOCK_BYTES * r
        wv = [e.load(b.add(b.add(group, wofs), const64(BLOCK_BYTES * r)), _V16I16) for r in range(ROW_GROUP)]
        for j in range(4):                   # group j = inputs [32j, 32j + 32) of the block: bits 7-2j, 6-2j
            shift = ir.Constant(_V16I16, [6 - 2 * j] * 16)
            xv = b.bitcast(e.load(e.addr(xp, xstride, 0, xofs, 32 * j), _V32I8), _V8I32)
            for w, acc in zip(wv, slots):
                codes = b.bitcast(b.and_(b.lshr(w, shift) if j < 3 else w, mask), _V8I32)
                b.store(b.call(e.dpbusd256, [b.load(acc[j]), codes, xv]), acc[j])
    rows = [[b.load(a) for a in acc] for acc in slots]
    return [b.add(b.add(a[0], a[1]), b.add(a[2], a[3])) for a in rows]


def _emit_dots_asm(e, groups, xp, xstride, nblk, C, prefetch):
    """The dots of P row groups x C token rows over all nblk blocks as one inline-assembly statement holding the
    block loop -> acc[p][c] (<16 x i32>). With the block body alone in assembly and the loop in IR, LLVM kept the
    16 accumulators of a 4 x 4 tile on the stack across iterations (16 loads and stores per 64 ``vpdpbusd``); in
    IR altogether it also hoisted the activation loads. Per block: each row group's codes are shifted straight
    from L1 (``vpsrlw`` / ``vpandq`` with a memory operand), each token row's 32 activations of an input group
    are broadcast once (``vbroadcasti64x4``) and used by all P groups. Same products, same integer results."""
    P = len(groups)
    assert P * C + P + 2 + 1 <= 32, (P, C)      # accumulators, codes, activations and the mask in 32 registers
    b = e.b
    n_acc = P * C
    op = "${}".format
    accs = [[op(p * C + c) for c in range(C)] for p in range(P)]
    codes = [op(n_acc + p) for p in range(P)]
    xregs = [op(n_acc + P), op(n_acc + P + 1)]
    woff, xoff = op(n_acc + P + 2), op(n_acc + P + 3)       # byte offsets of the block in a group / a token row
    count = op(n_acc + P + 4)                                # blocks left (the block count's register)
    n_out = n_acc + P + 5
    mask = op(n_out + 1)                                     # 0x03 bytes
    wreg = [op(n_out + 2 + p) for p in range(P)]
    xreg = [op(n_out + 2 + P + c) for c in range(C)]
    lines = [f"vpxord {a}, {a}, {a}" for a in sum(accs, [])]
    lines += [f"xor {woff}, {woff}", f"xor {xoff}, {xoff}", f"test {count}, {count}", "jz 2f", "1:"]
    lines += [f"prefetcht0 {prefetch}({w}, {woff})" for w in wreg]
    for j in range(4):                       # group j = inputs [32j, 32j + 32) of the block: bits 7-2j, 6-2j
        for p in range(P):
            if j < 3:
                lines += [f"vpsrlw $${6 - 2 * j}, ({wreg[p]}, {woff}), {codes[p]}",
                          f"vpandq {mask}, {codes[p]}, {codes[p]}"]
            else:
                lines.append(f"vpandq ({wreg[p]}, {woff}), {mask}, {codes[p]}")
        for c in range(C):
            xv = xregs[c % 2]
            lines.append(f"vbroadcasti64x4 {32 * j}({xreg[c]}, {xoff}), {xv}")
            lines += [f"vpdpbusd {xv}, {codes[p]}, {accs[p][c]}" for p in range(P)]
    lines += [f"add $${GROUP_BYTES}, {woff}", f"add $${BLOCK}, {xoff}", f"dec {count}", "jnz 1b", "2:"]
    # outputs: accumulators, temporaries, the two offsets, the counter; inputs: the block count (tied to the
    # counter), the mask, the addresses
    constraints = ["=&v"] * (n_acc + P + 2) + ["=&r", "=&r", "=r", str(n_acc + P + 4), "v"] + ["r"] * (P + C)
    ptr = I8.as_pointer()
    fty = ir.FunctionType(ir.LiteralStructType([_V16I32] * (n_acc + P + 2) + [I64] * 3),
                          [I64, _V16I32] + [ptr] * (P + C))
    # no side effects and no memory clobber: the statement only reads xq and packed, which nothing in a matmul
    # writes
    asm = ir.InlineAsm(fty, "\n\t".join(lines), ",".join(constraints), side_effect=False)
    args = [nblk, ir.Constant(_V16I32, [0x03030303] * 16)] + [b.inttoptr(g, ptr) for g in groups]
    args += [b.inttoptr(e.addr(xp, xstride, c, const64(0)), ptr) for c in range(C)]
    res = b.call(asm, args)
    return [[b.extract_value(res, p * C + c) for c in range(C)] for p in range(P)]


def _emit_epilogue_rows(e, context, sig, args, acc, C, n0, t0):
    """The epilogue of a GROUPS x C tile from its accumulators: per token row the 8 weight rows' lane sums by a
    shuffle-and-add tree (integer sums: any order gives the same values), then out[t, n0 .. n0 + 7] =
    float64(dot - xsum[t]) / float64(xscale[t]) * float64(wscale[n]) as one <8 x double> division and product
    (IEEE, correctly rounded in every lane: the scalar epilogue's bits), rounded once to out's type and stored
    as 8 consecutive elements. Four ``ternary._emit_epilogue_2x4`` (per row group: vphaddd trees, element
    inserts and extracts) took ~37 ns of a tile's fixed cost."""
    b = e.b
    f64 = ir.DoubleType()
    v8f64 = ir.VectorType(f64, 8)
    ptr = _epilogue_operands(context, b, sig, args)

    def pick(x, y, idx):
        return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(I32, len(idx)), idx))

    # rows 2p, 2p + 1 of group p: lanes 0-7 and 8-15 of acc[p][c]. Level 1 halves the partial sums of two groups'
    # rows (4 rows x 4 partials), level 2 of all 8 rows (8 x 2), level 3 leaves one sum per row
    first = [i for q in range(4) for i in range(8 * q, 8 * q + 4)]
    second = [i + 4 for i in first]
    ws = b.fpext(b.load(b.bitcast(ptr("wscale", n0), ir.VectorType(ir.FloatType(), 8).as_pointer()), align=1),
                 v8f64)
    out_t = sig.args[7].dtype
    for c in range(C):
        half = [b.add(pick(acc[p][c], acc[p + 1][c], first), pick(acc[p][c], acc[p + 1][c], second))
                for p in (0, 2)]
        rows2 = b.add(pick(half[0], half[1], [i for i in range(32) if i % 4 < 2]),
                      pick(half[0], half[1], [i for i in range(32) if i % 4 >= 2]))
        sums = b.add(pick(rows2, rows2, list(range(0, 16, 2))), pick(rows2, rows2, list(range(1, 16, 2))))
        t = b.add(t0, const64(c))
        xsum = b.load(ptr("xsum", t))
        # |dot - xsum| <= 512 K < 2^31 (ternary_matmul checks K): the int32 difference is exact
        diff = b.sub(sums, e.splat(xsum, 8))
        scale8 = e.splat(b.fpext(b.load(ptr("xscale", t)), f64), 8)
        v = b.fmul(b.fdiv(b.sitofp(diff, v8f64), scale8), ws)
        if out_t == types.float32:
            v = b.fptrunc(v, ir.VectorType(ir.FloatType(), 8))
        b.store(v, b.bitcast(ptr("out", t, n0), v.type.as_pointer()), align=1)


def _tile_codegen(C, prefetch):
    def codegen(context, builder, sig, args):
        n0, t0 = args[2], args[3]
        e = _Emit512(builder)
        first, gstride, xp, xstride, nblk = _tile_operands(context, builder, sig, args)
        if C > 1:
            groups = [builder.add(first, builder.mul(gstride, const64(p))) for p in range(GROUPS)]
            acc = _emit_dots_asm(e, groups, xp, xstride, nblk, C, prefetch)
            _emit_epilogue_rows(e, context, sig, args, acc, C, n0, t0)
        else:
            dots = [[builder.call(e.hsum, [v])] for v in _emit_dots_one_token(e, first, xp, xstride, nblk, prefetch)]
            _emit_epilogue(context, builder, sig, args, dots, ROW_GROUP, 1, n0, t0)
        return context.get_dummy_value()
    return codegen


def _tile(C, prefetch):
    """C > 1: weight rows [n0, n0 + 2 GROUPS) against token rows [t0, t0 + C); C = 1: weight rows [n0, n0 + 2)
    against token row t0 (n0 even). Each row group's stream is prefetched ``prefetch`` bytes ahead."""
    return tile_intrinsic(_tile_codegen(C, prefetch))


_g44, _g43, _g42 = _tile(4, PREFETCH_GROUPS), _tile(3, PREFETCH_GROUPS), _tile(2, PREFETCH_GROUPS)
_g11 = _tile(1, PREFETCH_T1)


@njit(**JIT_EXACT)
def _rows_avx512(C, packed, xq, n_lo, n_hi, t, xscale, xsum, wscale, out):
    """Token rows [t, t + C) (C <= 4) against weight rows [n_lo, n_hi) (n_lo even); consecutive calls share the C
    token rows (in L1) and write along out's rows. One token row: a row group per call (the decode tile). More:
    GROUPS row groups per call while they last; the last rows of a task whose rows are not a multiple of
    2 * GROUPS (none in the 2B4T shapes) take the AVX2 tiles (``ternary._row_pairs_avx2``: the same integer dots
    and epilogue, the same bits), which saves compiling one-group VNNI tiles for them."""
    n = n_lo
    if C == 1:
        while n + 2 <= n_hi:
            _g11(packed, xq, n, t, xscale, xsum, wscale, out)
            n += 2
        if n < n_hi:
            odd_row(1, packed, xq, n, t, xscale, xsum, wscale, out)
        return
    while n + 2 * GROUPS <= n_hi:
        if C == 4:
            _g44(packed, xq, n, t, xscale, xsum, wscale, out)
        elif C == 3:
            _g43(packed, xq, n, t, xscale, xsum, wscale, out)
        else:
            _g42(packed, xq, n, t, xscale, xsum, wscale, out)
        n += 2 * GROUPS
    _row_pairs_avx2(C, packed, xq, n, n_hi, t, xscale, xsum, wscale, out)


@njit(**JIT_EXACT_PARALLEL)
def _matmul_avx512(xq, xscale, xsum, packed, wscale, out):
    """``ternary._matmul_avx2``'s task split and order with the VNNI tiles: ``prange`` over tasks of TASK_ROWS
    output rows, in which 4 token rows at a time sweep over the task's weights (in L2); one token row (decode)
    streams each row group once."""
    T = xq.shape[0]
    N = wscale.shape[0]
    for task in prange((N + TASK_ROWS - 1) // TASK_ROWS):
        n_lo = task * TASK_ROWS
        n_hi = min(N, n_lo + TASK_ROWS)
        for t in range(0, T, 4):
            _rows_avx512(min(4, T - t), packed, xq, n_lo, n_hi, t, xscale, xsum, wscale, out)
