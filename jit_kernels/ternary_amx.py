"""The ``amx`` ternary matmul: AMX-INT8 tile products over ``ternary``'s weight layout, the same integer dots and
the same float epilogue bits as the other kernels (``ternary`` has the layout, the math and the wrapper).

``tdpbssd`` multiplies a tile A of 16 rows x 64 int8 by a tile B of 64 x 16 int8 (in the VNNI layout: B row i
holds, for each of 16 columns, 4 consecutive k) and adds the int32 products into a 16 x 16 tile C. Here A is 16
token rows of ``xq`` x 64 inputs, B the ternary codes (0, 1, 2) of 16 weight rows, C[t, n] the dots in ``out``'s
order.

- Token tiles (``_token_tiles``): once per call, xq is copied into contiguous 1 KB A tiles (the last padded with
  zero rows), so each tile load is one sequential run instead of 16 rows of xq.
- Unpacking (``_emit_unpack_block``): block b of the 8 row groups of 16 weight rows is 8 zmm loads (one per
  group: the two rows' 32 bytes each); dword q of row r holds, in field j (bits 7-2j, 6-2j of each byte), the
  codes of inputs 128b + 32j + 4q + {0, 1, 2, 3}. A dword transpose (three rounds of two-source permutes) gathers
  dword q of the 16 rows into one vector; a shift and the mask 0x03030303 then give, per field j, a B row whose
  column c holds row c's codes of those 4 inputs: row (j % 2) * 8 + q of the B tile of k-chunk 2b + j // 2,
  which pairs with the 64 inputs of that chunk in their natural order.
- Tiles (``_tiles``): TA token tiles x TB weight columns (16 rows each) of accumulators, at most 8 tile
  registers: 2 x 2 (4 C, 2 A, 2 B) while two token tiles remain, 1 x 2 for a last single one. Block by block
  over K, the TB columns' block is unpacked into a small ring in L1 (``RING`` blocks of 2 TB KB) and multiplied
  by the token tiles at once: a task buffer unpacked once in L2 and reused by every token tile measured 1.5-2x
  slower at 32 token rows (its 64-byte stores to L2 cost more than unpacking again per pair of token tiles) and
  slower at 128 too. The tile configuration (all tiles 16 x 64 bytes) is loaded once per task of
  ``AMX_TASK_ROWS`` weight rows on the thread that runs it and released after it (so a context switch need not
  save 8 KB of tile data). The epilogue stores the C tiles to the stack and computes out[t, n] =
  float64(dot - xsum[t]) / float64(xscale[t]) * float64(wscale[n]) in <8 x double> vectors, the quotient
  correctly rounded by FMA corrections instead of a division (``_emit_divide``): the same bits as the other
  kernels. Rows past the task's last whole 16 weight rows (none in the 2B4T shapes) take the avx512 tiles, and
  so do calls of fewer than ``AMX_MIN_ROWS`` token rows.

Tile loads and stores must not straddle cache lines (measured several times slower): the buffers and the stack
slots start lines. The process must be allowed the tile state before the first tile instruction
(``_cpu.request_amx``: Linux grants it through ``arch_prctl``); compiled only where the CPU has AMX-TILE/INT8 and
AVX-512 (``_cpu.HAS_AMX_INSTRUCTIONS``), run only where the OS granted it (``_cpu.HAS_AMX``).
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ._config import JIT_EXACT, JIT_EXACT_PARALLEL
from ._ir import I8, I16, I32, I64, Emit, const64
from .ternary import GROUP_BYTES, ROW_GROUP, _epilogue_operands
from .ternary_avx512 import _matmul_avx512, _rows_avx512

TILE = 16                # rows of a tile (token rows of A and C, weight rows of a B tile)
TILE_K = 64              # inputs per tile product
TILE_BYTES = 1024        # one B tile: 16 rows of 64 bytes
AMX_TASK_ROWS = 64       # weight rows per parallel task (4 tile columns)
# fewer token rows take the avx512 kernel. 2B4T shapes, 2 threads (one thread): T = 4 avx512 is faster (AMX
# 0.73-0.92x), T = 5-7 AMX 1.14-1.43x, T = 8 1.27-1.59x (1.43-1.74x), T = 16 2.3-2.5x, T = 32 3.2-3.5x
AMX_MIN_ROWS = 5

_V16I32 = ir.VectorType(I32, 16)


class _EmitAMX(Emit):
    """``Emit`` plus the AMX intrinsics (explicit tile numbers: llvmlite has no ``x86_amx`` type)."""

    def __init__(self, builder):
        super().__init__(builder)
        ptr = I8.as_pointer()
        self.ldtilecfg = self.declare("llvm.x86.ldtilecfg", ir.VoidType(), [ptr])
        self.tilerelease = self.declare("llvm.x86.tilerelease", ir.VoidType(), [])
        self.tilezero = self.declare("llvm.x86.tilezero", ir.VoidType(), [I8])
        self.tileload = self.declare("llvm.x86.tileloadd64", ir.VoidType(), [I8, ptr, I64])
        self.tilestore = self.declare("llvm.x86.tilestored64", ir.VoidType(), [I8, ptr, I64])
        self.tdpbssd = self.declare("llvm.x86.tdpbssd", ir.VoidType(), [I8, I8, I8])     # signed x signed
        self.tdpbusd = self.declare("llvm.x86.tdpbusd", ir.VoidType(), [I8, I8, I8])     # unsigned x signed

    def tile(self, fn, *args):
        self.b.call(fn, [ir.Constant(I8, a) if isinstance(a, int) else a for a in args])

    def ptr(self, address):
        return self.b.inttoptr(address, I8.as_pointer())


def tile_registers(TA, TB):
    """Tile numbers for TA x TB accumulators C[ta][tb], TA A tiles and TB B tiles (at most 8 in all)."""
    assert TA * TB + TA + TB <= 8, (TA, TB)
    regC = [[ta * TB + tb for tb in range(TB)] for ta in range(TA)]
    return regC, [TA * TB + ta for ta in range(TA)], [TA * TB + TA + tb for tb in range(TB)]


def store_accumulators(e, regC):
    """IR: the C tiles to a cache-line aligned stack slot (tile rows that straddle lines store several times
    slower), C[ta][tb] at 1 KB * (ta * TB + tb), rows of 64 bytes -> the slot's address (i64)."""
    b = e.b
    TA, TB = len(regC), len(regC[0])
    cbuf = cgutils.alloca_once(b, ir.ArrayType(I32, TA * TB * TILE * TILE))
    cbuf.align = 64
    cbase = b.ptrtoint(cbuf, I64)
    for ta in range(TA):
        for tb in range(TB):
            e.tile(e.tilestore, regC[ta][tb], e.ptr(b.add(cbase, const64((ta * TB + tb) * TILE_BYTES))),
                   const64(TILE * 4))
    return cbase


def _aligned(b, data):
    """The first cache-line boundary at or after ``data`` (a buffer 64 bytes longer than its tiles), as i64."""
    return b.and_(b.add(b.ptrtoint(data, I64), const64(63)), const64(-64))


# ---- unpacking ---------------------------------------------------------------------------------------------

def transpose_plan(vecs, col):
    """A dword transpose as rounds of two-source shuffles of 16-lane vectors. ``vecs``: the input vectors, each as
    its 16 elements (tuples, lane order); ``col(el)``: the output vector an element goes to (each output gathers 16
    elements, in the order of the tuples) -> ([[(src a, src b, lane indices) per output] per round], the index of
    each output (by ``col``) among the last round's vectors). Each round pairs vectors holding the same outputs'
    elements and splits each pair's elements between half as many outputs."""
    rounds = []
    n_cols = len({col(el) for v in vecs for el in v})
    span = n_cols // 2
    while span >= 1:
        out_vecs, ops = [], []
        order = sorted(range(len(vecs)), key=lambda i: (sorted({col(el) for el in vecs[i]}), vecs[i][0]))
        for a, b in zip(order[::2], order[1::2]):
            cols = sorted({col(el) for el in vecs[a]})
            assert cols == sorted({col(el) for el in vecs[b]})
            where = {el: i for i, el in enumerate(vecs[a])}
            where.update({el: 16 + i for i, el in enumerate(vecs[b])})
            for c0 in cols[::span]:
                want = sorted([el for el in vecs[a] + vecs[b] if c0 <= col(el) < c0 + span],
                              key=lambda el: (col(el), el))
                ops.append((a, b, [where[el] for el in want]))
                out_vecs.append(want)
        rounds.append(ops)
        vecs = out_vecs
        span //= 2
    by_col = sorted(range(len(vecs)), key=lambda i: col(vecs[i][0]))
    return rounds, by_col


# block b of 8 row groups (vector g: lane 8r + q = dword q of row 2g + r) -> 8 vectors Z_q (lane 2g + r = dword q
# of row 2g + r): three rounds
_TRANSPOSE = transpose_plan([[(g, r, q) for r in range(2) for q in range(8)] for g in range(8)], lambda el: el[2])


def _emit_unpack_block(e, group, gstride, blk, dst, chunk_bytes):
    """IR: block ``blk`` of the 16 weight rows whose first row group starts at ``group`` -> their B tiles for
    k-chunks 2 blk and 2 blk + 1, at dst and dst + chunk_bytes (i64 addresses)."""
    b = e.b
    off = b.mul(blk, const64(GROUP_BYTES))
    vecs = [e.load(b.add(b.add(group, b.mul(gstride, const64(g))), off), _V16I32) for g in range(8)]
    rounds, by_q = _TRANSPOSE
    for ops in rounds:
        vecs = [b.shuffle_vector(vecs[x], vecs[y], ir.Constant(_V16I32, idx)) for x, y, idx in ops]
    vecs = [vecs[i] for i in by_q]
    mask = ir.Constant(_V16I32, [0x03030303] * 16)
    base = dst
    for q in range(8):
        for j in range(4):
            v = b.lshr(vecs[q], ir.Constant(_V16I32, [6 - 2 * j] * 16)) if j < 3 else vecs[q]
            row = b.and_(v, mask)
            addr = b.add(b.add(base, b.mul(chunk_bytes, const64(j // 2))), const64(((j % 2) * 8 + q) * TILE_K))
            b.store(row, b.inttoptr(addr, _V16I32.as_pointer()), align=64)


# ---- tile products -----------------------------------------------------------------------------------------

def _tile_state(release):
    @intrinsic
    def state(typingctx):
        def codegen(context, b, sig, args):
            e = _EmitAMX(b)
            if release:
                b.call(e.tilerelease, [])
                return context.get_dummy_value()
            # palette 1; all 8 tiles 16 rows of 64 bytes (the last token tile is padded with zero rows)
            cfg = cgutils.alloca_once(b, ir.ArrayType(I8, 64))
            cfg.align = 64
            p = b.bitcast(cfg, I8.as_pointer())
            cgutils.memset(b, p, const64(64), 0)
            b.store(ir.Constant(I8, 1), p)
            for reg in range(8):
                b.store(ir.Constant(I16, TILE_K), b.bitcast(b.gep(p, [ir.Constant(I32, 16 + 2 * reg)]),
                                                            I16.as_pointer()))
                b.store(ir.Constant(I8, TILE), b.gep(p, [ir.Constant(I32, 48 + reg)]))
            b.call(e.ldtilecfg, [p])
            return context.get_dummy_value()
        return types.void(), codegen
    return state


# load the tile configuration on the calling thread (each thread of the pool needs its own), and release the
# tile state again (so that a context switch need not save 8 KB of tile data)
_tile_config, _tile_release = _tile_state(False), _tile_state(True)


RING = 2                 # blocks of unpacked B tiles in flight in a call's L1 ring


def _tiles_codegen(TA, TB):
    """``_tiles``'s body: per block of K, unpack the TB columns' block into the ring, then two k-chunks of tile
    products; then the epilogue."""
    regC, regA, regB = tile_registers(TA, TB)

    def codegen(context, builder, sig, args):
        packed_v, n0, xa_v, tt0, m, ring_v = args[:6]
        nchunks = args[10]
        b = builder
        e = _EmitAMX(b)
        pk = context.make_array(sig.args[0])(context, b, packed_v)
        xa = context.make_array(sig.args[2])(context, b, xa_v)
        rg = context.make_array(sig.args[5])(context, b, ring_v)
        pstride = cgutils.unpack_tuple(b, pk.strides)[0]
        gstride = b.mul(pstride, const64(ROW_GROUP))
        first = b.add(b.ptrtoint(pk.data, I64), b.mul(n0, pstride))
        ap = b.add(_aligned(b, xa.data), b.mul(b.mul(tt0, nchunks), const64(TILE_BYTES)))
        ring = _aligned(b, rg.data)
        chunk_bytes = const64(TB * TILE_BYTES)                # a k-chunk's B tiles of the TB columns
        block_bytes = 2 * TB * TILE_BYTES
        stride = const64(TILE_K)
        for reg in sum(regC, []):
            e.tile(e.tilezero, reg)
        nblk = b.sdiv(nchunks, const64(2))
        with cgutils.for_range(b, nblk) as loop:
            blk = loop.index
            slot = b.add(ring, b.mul(b.srem(blk, const64(RING)), const64(block_bytes)))
            for tb in range(TB):
                group = b.add(first, b.mul(gstride, const64(tb * TILE // ROW_GROUP)))
                _emit_unpack_block(e, group, gstride, blk, b.add(slot, const64(tb * TILE_BYTES)), chunk_bytes)
            for h in range(2):
                kc = b.add(b.mul(blk, const64(2)), const64(h))
                for ta in range(TA):
                    a_addr = b.add(ap, b.mul(b.add(kc, b.mul(nchunks, const64(ta))), const64(TILE_BYTES)))
                    e.tile(e.tileload, regA[ta], e.ptr(a_addr), stride)
                for tb in range(TB):
                    e.tile(e.tileload, regB[tb], e.ptr(b.add(slot, const64(h * TB * TILE_BYTES + tb * TILE_BYTES))),
                           stride)
                    for ta in range(TA):
                        e.tile(e.tdpbssd, regC[ta][tb], regA[ta], regB[tb])
        cbase = store_accumulators(e, regC)
        _emit_epilogue(e, context, sig, args, cbase, TA, TB, m, b.mul(tt0, const64(TILE)), n0)
        return context.get_dummy_value()
    return codegen


def _tiles(TA, TB):
    """``(packed, n0, xa, tt0, m, ring, xscale, xsum, wscale, out, nchunks)``: token tiles [tt0, tt0 + TA) of
    ``xa`` (m of their rows real) against weight rows [n0, n0 + 16 TB) of ``packed`` (n0 even), unpacked on the
    way through ``ring`` (>= RING * 2 TB KB + 64 bytes), epilogue included. Needs ``_tile_config``."""
    codegen = _tiles_codegen(TA, TB)

    @intrinsic
    def tiles(typingctx, packed, n0, xa, tt0, m, ring, xscale, xsum, wscale, out, nchunks):
        if not all(isinstance(a, types.Array) for a in (packed, xa, ring, xscale, xsum, wscale, out)):
            return None
        sig = types.void(packed, types.intp, xa, types.intp, types.intp, ring, xscale, xsum, wscale, out,
                         types.intp)
        return sig, codegen
    return tiles


_t22, _t21, _t12, _t11 = _tiles(2, 2), _tiles(2, 1), _tiles(1, 2), _tiles(1, 1)


def _emit_epilogue(e, context, sig, args, cbase, TA, TB, m, t0, n0):
    """out[t, n] for the call's m token rows from t0 and 16 TB weight rows from n0, from the C tiles at
    ``cbase``: per token row and 8 weight rows, float64(dot - xsum[t]) / float64(xscale[t]) * float64(wscale[n])
    as <8 x double> operations (IEEE: each lane the scalar epilogue's bits), rounded once to out's type."""
    b = e.b
    f64 = ir.DoubleType()
    v8f64, v8i32 = ir.VectorType(f64, 8), ir.VectorType(I32, 8)
    ptr = _epilogue_operands(context, b, sig, args, first=6)      # _tiles' xscale, xsum, wscale, out
    out_t = sig.args[9].dtype
    fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(v8f64, [v8f64] * 3), "llvm.fma.v8f64")
    ws = []
    for tb in range(TB):
        for h in range(2):
            n = b.add(n0, const64(TILE * tb + 8 * h))
            wv = b.load(b.bitcast(ptr("wscale", n), ir.VectorType(ir.FloatType(), 8).as_pointer()), align=4)
            ws.append(b.fpext(wv, v8f64))
    for ta in range(TA):
        rows = b.sub(m, const64(TILE * ta))
        rows = b.select(b.icmp_signed(">", rows, const64(TILE)), const64(TILE), rows)
        with cgutils.for_range(b, rows) as loop:
            i = loop.index
            t = b.add(t0, b.add(const64(TILE * ta), i))
            xsum = e.splat(b.load(ptr("xsum", t)), 8)
            s64 = b.fpext(b.load(ptr("xscale", t)), f64)
            scale = e.splat(s64, 8)
            recip = e.splat(b.fdiv(ir.Constant(f64, 1.0), s64), 8)
            for tb in range(TB):
                crow = b.add(cbase, b.add(const64((ta * TB + tb) * TILE * TILE * 4), b.mul(i, const64(TILE * 4))))
                for h in range(2):
                    dots = b.load(b.inttoptr(b.add(crow, const64(32 * h)), v8i32.as_pointer()), align=32)
                    # |dot - xsum| <= 512 K < 2^31 (ternary_matmul checks K): the int32 difference is exact
                    v = b.fmul(_emit_divide(b, fma, b.sitofp(b.sub(dots, xsum), v8f64), scale, recip), ws[2 * tb + h])
                    if out_t == types.float32:
                        v = b.fptrunc(v, ir.VectorType(ir.FloatType(), 8))
                    n = b.add(n0, const64(TILE * tb + 8 * h))
                    b.store(v, b.bitcast(ptr("out", t, n), v.type.as_pointer()), align=4)


def _emit_divide(b, fma, d, s, r):
    """IR: d / s correctly rounded (IEEE division's bits) for <8 x double> d, s with r = 1 / s (correctly
    rounded), without a division: q0 = d r is within 2 ulp of d / s; one correction q1 = q0 + (d - q0 s) r (each
    FMA rounded once) is within 1 ulp, and then Markstein's theorem makes q2 = RN(q1 + RN(d - q1 s) r) the
    correctly rounded quotient (the remainder d - q1 s is exact). ``vdivpd`` on zmm issues once per 16 cycles on
    Sapphire Rapids; these five operations take ~3. No overflow or underflow: |d| < 2^31, s a float32 scale."""
    q = b.fmul(d, r)
    for _ in range(2):
        e = b.call(fma, [b.fneg(q), s, d])
        q = b.call(fma, [e, r, q])
    return q


@njit(**JIT_EXACT)
def _task_tiles(packed, xa, T, nchunks, ring, ncols, n0, xscale, xsum, wscale, out):
    """All T token rows against weight rows [n0, n0 + 16 ncols), unpacked on the way (``_tiles``): two token tiles
    at a time (one for a last single tile) against 2 columns at a time."""
    ntiles = (T + TILE - 1) // TILE
    tt = 0
    while tt < ntiles:
        pair = tt + 2 <= ntiles
        m = min(2 * TILE, T - TILE * tt)
        c = 0
        while c + 2 <= ncols:
            if pair:
                _t22(packed, n0 + TILE * c, xa, tt, m, ring, xscale, xsum, wscale, out, nchunks)
            else:
                _t12(packed, n0 + TILE * c, xa, tt, m, ring, xscale, xsum, wscale, out, nchunks)
            c += 2
        if c < ncols and pair:
            _t21(packed, n0 + TILE * c, xa, tt, m, ring, xscale, xsum, wscale, out, nchunks)
        elif c < ncols:
            _t11(packed, n0 + TILE * c, xa, tt, m, ring, xscale, xsum, wscale, out, nchunks)
        tt += 2 if pair else 1


@njit(**JIT_EXACT)
def _token_tiles(xq, xa):
    """xq [T, Kp] -> A tiles: from xa's first cache line, tile (tt, kc) at TILE_BYTES * (tt * Kp / 64 + kc), its
    row r = xq[16 tt + r, 64 kc .. 64 kc + 64], rows past T zero. Contiguous tiles stream from L2; the rows of
    xq would be 16 streams per tile."""
    T, Kp = xq.shape
    nchunks = Kp // TILE_K
    off = (-_address(xa)) % 64
    for tt in range((T + TILE - 1) // TILE):
        for kc in range(nchunks):
            base = off + (tt * nchunks + kc) * TILE_BYTES
            for r in range(TILE):
                t = TILE * tt + r
                dst = xa[base + TILE_K * r:base + TILE_K * (r + 1)]
                if t < T:
                    src = xq[t, TILE_K * kc:TILE_K * (kc + 1)]
                    for i in range(TILE_K):
                        dst[i] = src[i]
                else:
                    dst[:] = 0


@intrinsic
def _address(typingctx, a):
    if not isinstance(a, types.Array):
        return None

    def codegen(context, b, sig, args):
        return b.ptrtoint(context.make_array(sig.args[0])(context, b, args[0]).data, I64)
    return types.intp(a), codegen


@njit(**JIT_EXACT_PARALLEL)
def _matmul_amx(xq, xscale, xsum, packed, wscale, out):
    """The token rows as A tiles (one copy, ``_token_tiles``), then ``prange`` over tasks of AMX_TASK_ROWS weight
    rows, each with its own L1 ring (``_task_tiles``: two weight columns at a time, unpacked block by block as the
    token tiles pass); fewer than AMX_MIN_ROWS token rows take the avx512 kernel."""
    T, Kp = xq.shape
    N = wscale.shape[0]
    if T < AMX_MIN_ROWS:
        _matmul_avx512(xq, xscale, xsum, packed, wscale, out)
        return
    ntiles = (T + TILE - 1) // TILE
    xa = np.empty(ntiles * Kp * TILE + 64, np.int8)
    _token_tiles(xq, xa)
    for task in prange((N + AMX_TASK_ROWS - 1) // AMX_TASK_ROWS):
        n_lo = task * AMX_TASK_ROWS
        n_hi = min(N, n_lo + AMX_TASK_ROWS)
        ncols = (n_hi - n_lo) // TILE
        if ncols > 0:
            ring = np.empty(RING * 4 * TILE_BYTES + 64, np.uint8)
            _tile_config()
            _task_tiles(packed, xa, T, Kp // TILE_K, ring, ncols, n_lo, xscale, xsum, wscale, out)
            _tile_release()
        n_rest = n_lo + TILE * ncols
        if n_rest < n_hi:
            for t in range(0, T, 4):
                _rows_avx512(min(4, T - t), packed, xq, n_rest, n_hi, t, xscale, xsum, wscale, out)
