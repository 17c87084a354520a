"""Per-token int8 activation quantization and the exact ternary matmul, with two matmul kernels.

Kernel weight layout ("I2 blocks, rows in pairs"; each row's bytes are bitnet.cpp's x86 I2_S payload;
pack / unpack live in ``bitnet_batch.model.layout``)::

    a row (output feature n) = K / 128 blocks of 32 bytes; K (input dim) padded to a multiple of 128
    block b of a row holds inputs [128*b, 128*b + 128):
        byte m: bits 7-6 -> input 128b + m, bits 5-4 -> 128b + 32 + m,
                bits 3-2 -> 128b + 64 + m, bits 1-0 -> 128b + 96 + m
    code c in {0, 1, 2} means weight c - 1 in {-1, 0, +1} (code 3, never written by bitnet.cpp's quantizer,
    is multiplied as 3 by both kernels, as bitnet.cpp's own dot product does)
    packed  uint8 [Np, K // 4], C-contiguous, Np = N rounded up to a multiple of ROW_GROUP = 2: rows
            [2g, 2g + 2) of it are row group g, in which block b of row 2g + r sits at byte 64b + 32r
            (padding row: code 1; its dots are never stored)
    wscale  float32 [N]              # per output row (a per-tensor scale repeated)

With rows in pairs, a one-token (decode, memory bound) tile reads one sequential stream (a row group) instead
of rows that each restart a stream: ~17% less time per one-token matmul from DRAM than ungrouped rows (8-28%
over shapes and runs), the same for more tokens (each two-row tile reads one whole cache line per block).
Measured in one process against the ungrouped layout; groups of 4 rows read by 4-row decode tiles gave 25-35%
but cost the batched tiles 3-6%.

Math (BitNet b1.58, as bitnet.cpp computes it)::

    s_t   = 127 / max(max|x_t|, 1e-5)                 # per token (row of x)
    q_t   = clamp(rint(x_t * s_t), -128, 127)          # int8, round half to even
    y[t,n] = (sum_k c[n,k] * q[t,k] - sum_k q[t,k]) / s_t * wscale[n]

The integer dot is exact and the float epilogue is the same per element in every kernel, so a row's result
never depends on the kernel, the batch it is computed in or the thread count (bit-identical).

Kernels (``KERNEL`` is chosen once at import by ``_cpu``; ``BITNET_BATCH_KERNEL=auto|amx|avx512|avx2|portable``
forces one):

- ``amx``: AMX-INT8 tile products (``ternary_amx``) for steps of ``AMX_MIN_ROWS`` token rows or more, the
  ``avx512`` kernel for fewer; on CPUs (and OSes) that have AMX.
- ``avx512``: AVX-512 VNNI tiles of 8 weight rows x 4 token rows (``ternary_avx512``), on CPUs that have it.
- ``avx2``: bitnet.cpp's I2_S dot written as LLVM IR (Numba ``@intrinsic``; the block body of the batched tiles
  as inline assembly, see ``_emit_block_asm``): ``vpmaddubsw`` of 32 code bytes
  (unsigned 0..2) with 32 int8 activations gives int16 pair sums; they are added in int16 over
  ``I16_BLOCKS`` blocks, then widened to int32 lanes by ``vpmaddwd`` with ones. One call computes a tile of
  R = 2 weight rows (one row group) x C <= 4 token rows over the whole K (each weight vector is unpacked
  once, by a shift and a mask, and applied to C token rows), prefetches the group's stream ``PREFETCH`` bytes
  ahead and ends with the float epilogue. One token row (decode) uses a row group x 1 tile written in IR that
  prefetches the group's stream ``PREFETCH_T1`` bytes ahead. Chosen only when the CPU Numba compiles for has
  AVX2 (with FMA and F16C, which the lm_head needs) and the JIT is on.
- ``portable``: plain Numba (any CPU; also runs under ``NUMBA_DISABLE_JIT``): tiles of 2 weight rows x 2
  token rows, integer arithmetic vectorised by LLVM. About 8x slower than ``avx2`` (1.5x faster than the
  scalar kernel they replaced).

The AVX2 tiles take their activations as ``vpmaddubsw`` memory operands: they run 5-10% faster than with
register loads when xq and packed start cache lines (``buffers``; the engine allocates both there) and ~25%
slower when the operands straddle lines (NumPy's own large arrays start 16 bytes past one). Results never
depend on alignment.

All run ``prange`` over tasks of ``TASK_ROWS`` output rows (never over K). Inside a task, 4 token rows at
a time sweep over the task's weight rows: the token rows stay in L1, the task's weights (<= 110 KB) in L2,
and the results are written along rows of ``out``. The matmul kernels are compiled without fastmath (they
do integer work; the float epilogue must keep its written order wherever it is inlined).

``quantize_rows`` runs serially for small inputs (a decode step's rows): waking the thread pool would cost
more than the work. ``scripts/bench_kernels.py`` measures all of this.
"""
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic, register_jitable

from ._config import JIT, JIT_EXACT, JIT_EXACT_PARALLEL, JIT_PARALLEL, serial
from ._cpu import KERNEL, check_kernel
from ._ir import I8, I16, I32, I64, Emit
from .bits import F64_ABS_MASK, f64_bits, f64_from_bits
from .norms import inv_rms

llvm.initialize_native_asmparser()     # the AVX2 tiles hold inline assembly (``_emit_block_asm``)

BLOCK = 128          # inputs per packed block
BLOCK_BYTES = 32     # bytes per packed block
TASK_ROWS = 64       # output rows per parallel task (weights of a task: 64 * K/4 bytes, <= 110 KB, stay in L2)
ROW_GROUP = 2        # weight rows per interleaved group (see the layout above)
GROUP_BYTES = ROW_GROUP * BLOCK_BYTES   # one block of every row of a group: the stride from block to block
PREFETCH = 2048      # bytes ahead in a row group's stream that the compute-bound tiles prefetch
PREFETCH_T1 = 4096   # bytes ahead in each row group's stream that the one-token tiles prefetch
MAX_K = 1 << 21      # widest input: |dot - xsum| <= 512 K stays an exact int32 (the 2 x 4 tiles' epilogue)
I16_BLOCKS = 10      # blocks summed in int16 before widening: 10 blocks * 4 groups * |3*128 + 3*128| < 2**15


@register_jitable
def padded_rows(n: int) -> int:
    """Output rows rounded up to whole row groups: the first dimension of a packed matrix of n rows (plain
    Python, and callable from jitted code)."""
    return -(-n // ROW_GROUP) * ROW_GROUP

# ---- activation quantization -----------------------------------------------------------------------------

def quantize_rows(x, xq, xscale, xsum):
    """Quantize each row of ``x`` (float32 or float64 [T, K]; float64 is rounded to float32 first, the
    quantizer itself runs in float32 arithmetic) into ``xq`` (int8 [T, Kp], Kp >= K, padding zeroed),
    ``xscale`` (float32 [T]: s_t) and ``xsum`` (int32 [T]: sum of the row's int8 values)."""
    _check_quantize("quantize_rows", x, None, xq, xscale, xsum)
    _quantize_any(x, None, 0.0, xq, xscale, xsum)


def norm_quantize_rows(x, w, eps, xq, xscale, xsum):
    """``quantize_rows`` of RMSNorm(x) * w without storing the normed rows: per row, the float64 sum of squares,
    then each normed value ``w[d] * (x[t, d] * r)`` (float64, as ``norms.rmsnorm``) is recomputed for the absmax
    pass and the rounding pass. x float32/float64 [T, K]; w float32 [K]; outputs as ``quantize_rows``."""
    _check_quantize("norm_quantize_rows", x, w, xq, xscale, xsum)
    _quantize_any(x, w, eps, xq, xscale, xsum)


def _check_quantize(name, x, w, xq, xscale, xsum):
    T, K = x.shape
    if x.dtype not in (np.float32, np.float64) or xq.dtype != np.int8:
        raise TypeError(f"{name}: want float32/float64 x and int8 xq, got {x.dtype}, {xq.dtype}")
    if w is not None and w.dtype != np.float32:
        raise TypeError(f"{name}: w must be float32, got {w.dtype}")
    if w is not None and w.shape != (K,):
        raise ValueError(f"{name}: w {w.shape} does not match x {x.shape}")
    if xq.shape[0] < T or xq.shape[1] < K or xscale.shape[0] < T or xsum.shape[0] < T:
        raise ValueError(f"{name}: output buffers too small for x {x.shape}: xq {xq.shape}")
    if xscale.dtype != np.float32 or xsum.dtype != np.int32:
        raise TypeError(f"{name}: xscale must be float32 and xsum int32")


def _quantize_any(x, w, eps, xq, xscale, xsum):
    if serial(x.shape[0] * x.shape[1]):
        _quantize_rows_serial(x, w, np.float32(eps), xq, xscale, xsum)
    else:
        _quantize_rows(x, w, np.float32(eps), xq, xscale, xsum)


@njit(inline="always", **JIT)
def _row_scale(x, w, eps, t):
    """1 / rms of row t when the row is normed (w an array), unused otherwise (w None: Numba prunes the branch
    that does not type, so one body serves both drivers, compiled or under ``NUMBA_DISABLE_JIT``)."""
    if w is None:
        return 1.0
    return inv_rms(x, eps, t)


@njit(inline="always", **JIT)
def _quant_value(x, w, r, t, k):
    """The value the quantizer sees at (t, k) before its rounding to float32: x itself, or the normed
    ``w[k] * (x[t, k] * r)`` (float64)."""
    if w is None:
        return np.float64(x[t, k])
    return np.float64(w[k]) * (np.float64(x[t, k]) * r)


@njit(inline="always", **JIT)
def _quantize_row(x, w, eps, t, xq, xscale, xsum):
    K = x.shape[1]
    r = _row_scale(x, w, eps, t)
    # absmax of the float32 inputs = float32 of the float64 absmax (rounding is monotone), reduced on the
    # magnitude bits: an integer max vectorises, a float one stays scalar (~3x slower)
    mbits = np.uint64(0)
    for k in range(K):
        b = f64_bits(_quant_value(x, w, r, t, k)) & F64_ABS_MASK
        if b > mbits:
            mbits = b
    amax = np.float32(f64_from_bits(mbits))
    if amax < np.float32(1e-5):
        amax = np.float32(1e-5)
    s = np.float32(127.0) / amax
    total = np.int32(0)
    for k in range(K):
        # float32 bounds: a float64 compare would widen every lane and keep the loop from vectorising well
        q = np.rint(np.float32(_quant_value(x, w, r, t, k)) * s)
        q = min(max(q, np.float32(-128.0)), np.float32(127.0))
        qi = np.int32(q)
        xq[t, k] = np.int8(qi)
        total += qi
    for k in range(K, xq.shape[1]):
        xq[t, k] = 0
    xscale[t] = s
    xsum[t] = total


@njit(**JIT_PARALLEL)
def _quantize_rows(x, w, eps, xq, xscale, xsum):
    for t in prange(x.shape[0]):
        _quantize_row(x, w, eps, t, xq, xscale, xsum)


@njit(**JIT)
def _quantize_rows_serial(x, w, eps, xq, xscale, xsum):
    # a decode step's few rows take microseconds: not worth waking the thread pool (costly when loaded)
    for t in range(x.shape[0]):
        _quantize_row(x, w, eps, t, xq, xscale, xsum)


# ---- the matmul ------------------------------------------------------------------------------------------

def ternary_matmul(xq, xscale, xsum, packed, wscale, out, kernel=None):
    """out[t, n] = exact ternary dot of row t with weight row n, rescaled (see module docstring).

    xq int8 [T, Kp] (rows may be strided, elements contiguous); xscale float32 [T]; xsum int32 [T];
    packed uint8 [Np, Kp // 4], C-contiguous, Np = N rounded up to whole row groups (a slice of whole groups
    of a larger matrix is fine); wscale float32 [N]; out float32 or float64 [T, N] (rows may be strided,
    elements contiguous: the avx512 and amx tiles store 8 consecutive outputs at once). ``kernel``: ``"amx"`` /
    ``"avx512"`` / ``"avx2"`` / ``"portable"``, default ``KERNEL``."""
    T, Kp = xq.shape
    Np, KB = packed.shape
    N = wscale.shape[0]
    if xq.dtype != np.int8 or packed.dtype != np.uint8:
        raise TypeError(f"ternary_matmul: want int8 xq / uint8 packed, got {xq.dtype} / {packed.dtype}")
    if Kp % BLOCK or KB * 4 != Kp:
        raise ValueError(f"ternary_matmul: xq width {Kp} must equal 4 * packed width {KB}, a multiple of {BLOCK}")
    if Kp > MAX_K:
        raise ValueError(f"ternary_matmul: input width {Kp} exceeds {MAX_K} (int32 dots)")
    if out.shape[0] != T or out.shape[1] != N or Np != padded_rows(N):
        raise ValueError(f"ternary_matmul: out {out.shape} / packed {packed.shape} do not match T={T} and "
                         f"N={N} (wscale) in groups of {ROW_GROUP} rows")
    if xscale.shape[0] < T or xsum.shape[0] < T:
        raise ValueError(f"ternary_matmul: xscale {xscale.shape} / xsum {xsum.shape} shorter than T={T}")
    if out.dtype not in (np.float32, np.float64) or wscale.dtype != np.float32:
        raise TypeError("ternary_matmul: out must be float32/float64 and wscale float32")
    if xscale.dtype != np.float32 or xsum.dtype != np.int32:
        raise TypeError("ternary_matmul: xscale must be float32 and xsum int32")
    if xq.strides[1] != 1 or out.strides[1] != out.itemsize:
        raise ValueError("ternary_matmul: the rows of xq and out must be contiguous (unit element stride)")
    if not packed.flags.c_contiguous:
        raise ValueError("ternary_matmul: packed must be C-contiguous (its row groups are runs of bytes)")
    kernel = check_kernel("ternary_matmul", KERNEL if kernel is None else kernel)
    if kernel == "amx":
        _matmul_amx(xq, xscale, xsum, packed, wscale, out)
    elif kernel == "avx512":
        _matmul_avx512(xq, xscale, xsum, packed, wscale, out)
    elif kernel == "avx2":
        _matmul_avx2(xq, xscale, xsum, packed, wscale, out)
    else:
        _matmul_portable(xq, xscale, xsum, packed, wscale, out)


# Compiled without fastmath wherever it is inlined: reassoc would let LLVM turn a / b * c into (a * c) / b in
# one loop and not in another. The AVX2 tiles emit the same instructions (``_emit_epilogue``).
@njit(inline="always", **JIT_EXACT)
def _epilogue(acc, xsum_t, xscale_t, ws):
    # float64: exact for |acc| < 2^53, rounded once when stored
    return np.float64(acc - xsum_t) / np.float64(xscale_t) * np.float64(ws)


# ---- AVX2 kernel -----------------------------------------------------------------------------------------

_V32I8, _V16I16, _V8I32 = ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I32, 8)


class _Emit(Emit):
    """``Emit`` plus the integer-dot intrinsics."""

    def __init__(self, builder):
        super().__init__(builder)
        self.pmaddubsw = self.declare("llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
        self.pmaddwd = self.declare("llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
        self.hsum = self.declare("llvm.vector.reduce.add.v8i32", I32, [_V8I32])
        self.phadd = self.declare("llvm.x86.avx2.phadd.d", _V8I32, [_V8I32, _V8I32])


def _emit_block(e, rows, xp, xstride, blk, acc16, R, C, prefetch):
    """IR for block ``blk``: acc16[r][c] (<16 x i16> values) += codes(row r) . x(token c) over its 128 inputs
    (row r's block at rows[r] + blk * GROUP_BYTES). Used by the memory-bound one-token tiles, which prefetch
    each row group's stream ``prefetch`` bytes ahead; the compute-bound ones take ``_emit_block_asm``."""
    b = e.b
    mask = ir.Constant(_V16I16, [0x0303] * 16)
    wofs = b.mul(blk, ir.Constant(I64, GROUP_BYTES))
    xofs = b.mul(blk, ir.Constant(I64, BLOCK))
    for r in range(0, R if prefetch > 0 else 0, ROW_GROUP):
        e.prefetch_read(b.add(b.add(rows[r], wofs), ir.Constant(I64, prefetch)))
    # the 32 code bytes of each row as 16-bit lanes: a 16-bit shift + mask 0x0303 extracts a 2-bit field per byte
    wv = [e.load(b.add(rows[r], wofs), _V16I16) for r in range(R)]
    for j in range(4):                       # group j = inputs [32j, 32j + 32) of the block: bits 7-2j, 6-2j
        shift = ir.Constant(_V16I16, [6 - 2 * j] * 16)
        codes = [b.bitcast(b.and_(b.lshr(w, shift) if j < 3 else w, mask), _V32I8) for w in wv]
        for c in range(C):
            xv = e.load(e.addr(xp, xstride, c, xofs, 32 * j), _V32I8)
            for r in range(R):
                acc16[r][c] = b.add(acc16[r][c], b.call(e.pmaddubsw, [codes[r], xv]))


def _emit_block_asm(e, rows, xp, xstride, blk, acc16, R, C, prefetch):
    """``_emit_block`` as one inline-assembly statement, for the compute-bound tiles (R rows x C <= 4 tokens
    with R * C + 2 * R + 1 <= 16 vector registers). LLVM's scheduler hoisted loads and products of the IR
    version and spilled accumulators to the stack in the inner loop (~7 stores and reloads per block); here the
    accumulators stay in registers and each code vector is re-read from L1 instead of kept: ~6-10% more
    GMAC/s. The activations are ``vpmaddubsw``'s memory operand (read once per weight row) rather than loaded
    into a register first: 5-6% more GMAC/s when xq is cache-line aligned (``buffers``), ~25% less when its
    32-byte operands straddle cache lines. Same products, same integer results."""
    assert R * C + 2 * R + 1 <= 16, (R, C)      # accumulators, temporaries and the mask in 16 ymm registers
    b = e.b
    wofs = b.mul(blk, ir.Constant(I64, GROUP_BYTES))
    xofs = b.mul(blk, ir.Constant(I64, BLOCK))
    n_acc, n_tmp = R * C, 2 * R
    n_out = n_acc + n_tmp
    op = "${}".format
    acc = [[op(r * C + c) for c in range(C)] for r in range(R)]
    codes = [op(n_acc + r) for r in range(R)]
    prods = [op(n_acc + R + r) for r in range(R)]
    mask = op(n_out + n_acc)
    wreg = [op(n_out + n_acc + 1 + r) for r in range(R)]
    xreg = [op(n_out + n_acc + 1 + R + c) for c in range(C)]
    lines = [f"prefetcht0 {prefetch}({wreg[r]})" for r in range(0, R, ROW_GROUP)] if prefetch > 0 else []
    for j in range(4):                       # group j = inputs [32j, 32j + 32) of the block: bits 7-2j, 6-2j
        for r in range(R):
            if j < 3:
                lines += [f"vmovdqu ({wreg[r]}), {codes[r]}", f"vpsrlw $${6 - 2 * j}, {codes[r]}, {codes[r]}",
                          f"vpand {mask}, {codes[r]}, {codes[r]}"]
            else:
                lines.append(f"vpand ({wreg[r]}), {mask}, {codes[r]}")
        for c in range(C):           # the activations as memory operands: one load per product, no register
            for r in range(R):
                lines += [f"vpmaddubsw {32 * j}({xreg[c]}), {codes[r]}, {prods[r]}",
                          f"vpaddw {prods[r]}, {acc[r][c]}, {acc[r][c]}"]
    constraints = ["=x"] * n_acc + ["=&x"] * n_tmp + [str(i) for i in range(n_acc)] + ["x"] + ["r"] * (R + C)
    ptr = I8.as_pointer()
    fty = ir.FunctionType(ir.LiteralStructType([_V16I16] * n_out), [_V16I16] * (n_acc + 1) + [ptr] * (R + C))
    # no side effects and no memory clobber: the statement only reads xq and packed, which nothing in a matmul
    # writes, and its operands (addresses) differ for every block, so LLVM can neither merge nor hoist it
    asm = ir.InlineAsm(fty, "\n\t".join(lines), ",".join(constraints), side_effect=False)
    args = [acc16[r][c] for r in range(R) for c in range(C)] + [ir.Constant(_V16I16, [0x0303] * 16)]
    args += [b.inttoptr(b.add(rows[r], wofs), ptr) for r in range(R)]
    args += [b.inttoptr(e.addr(xp, xstride, c, xofs), ptr) for c in range(C)]
    res = b.call(asm, args)
    for r in range(R):
        for c in range(C):
            acc16[r][c] = b.extract_value(res, r * C + c)


def _emit_dots(e, rows, xp, xstride, nblk, R, C, prefetch, asm, lanes=False):
    """IR: the R x C integer dots over nblk blocks -> i32 values [r][c] (``lanes``: the <8 x i32> vectors whose
    lane sums they are)."""
    builder = e.b
    zero16, zero32 = ir.Constant(_V16I16, None), ir.Constant(_V8I32, None)
    ones16 = ir.Constant(_V16I16, [1] * 16)
    # int32 accumulators live across the whole K, int16 ones across I16_BLOCKS blocks (allocas, turned
    # into registers by SROA)
    acc32 = [[cgutils.alloca_once_value(builder, zero32) for _ in range(C)] for _ in range(R)]
    acc16 = [[cgutils.alloca_once_value(builder, zero16) for _ in range(C)] for _ in range(R)]
    step = ir.Constant(I64, I16_BLOCKS)
    with cgutils.for_range_slice(builder, ir.Constant(I64, 0), nblk, step) as (b0, _):
        b1 = builder.add(b0, step)
        end = builder.select(builder.icmp_signed("<", b1, nblk), b1, nblk)
        for acc in sum(acc16, []):
            builder.store(zero16, acc)
        with cgutils.for_range_slice(builder, b0, end, ir.Constant(I64, 1)) as (blk, _):
            vals = [[builder.load(a) for a in row] for row in acc16]
            emit = _emit_block_asm if asm else _emit_block
            emit(e, rows, xp, xstride, blk, vals, R, C, prefetch)
            for r in range(R):
                for c in range(C):
                    builder.store(vals[r][c], acc16[r][c])
        for a16, a32 in zip(sum(acc16, []), sum(acc32, [])):      # widen: pairs of int16 lanes -> int32
            wide = builder.call(e.pmaddwd, [builder.load(a16), ones16])
            builder.store(builder.add(builder.load(a32), wide), a32)
    if lanes:
        return [[builder.load(a) for a in row] for row in acc32]
    return [[builder.call(e.hsum, [builder.load(a)]) for a in row] for row in acc32]


def _epilogue_operands(context, builder, sig, args, first=4):
    """``ptr(name, *idx)``: the IR address of xscale / xsum / wscale / out[idx] (a tile's arguments first ..
    first + 3)."""
    arrays = {}
    for i, name in enumerate(("xscale", "xsum", "wscale", "out")):
        arrays[name] = (sig.args[first + i], context.make_array(sig.args[first + i])(context, builder, args[first + i]))

    def ptr(name, *idx):
        aryty, ary = arrays[name]
        return cgutils.get_item_pointer(context, builder, aryty, ary, list(idx), wraparound=False)
    return ptr


def _emit_epilogue(context, builder, sig, args, dots, R, C, n0, t0):
    """IR: out[t0 + c, n0 + r] = float64(dot - xsum[t]) / float64(xscale[t]) * float64(wscale[n]), rounded
    once to out's type. Plain IEEE instructions (no fast-math flags): the same bits as ``_epilogue``."""
    f64 = ir.DoubleType()
    ptr = _epilogue_operands(context, builder, sig, args)
    t = [builder.add(t0, ir.Constant(I64, c)) for c in range(C)]
    scale = [builder.fpext(builder.load(ptr("xscale", tc)), f64) for tc in t]
    xsum = [builder.sext(builder.load(ptr("xsum", tc)), I64) for tc in t]
    out_f32 = sig.args[7].dtype == types.float32
    for r in range(R):
        n = builder.add(n0, ir.Constant(I64, r))
        ws = builder.fpext(builder.load(ptr("wscale", n)), f64)
        for c in range(C):
            v = builder.sitofp(builder.sub(builder.sext(dots[r][c], I64), xsum[c]), f64)
            v = builder.fmul(builder.fdiv(v, scale[c]), ws)
            builder.store(builder.fptrunc(v, ir.FloatType()) if out_f32 else v, ptr("out", t[c], n))


def _emit_epilogue_2x4(e, context, sig, args, lanes, n0, t0):
    """``_emit_epilogue`` of a 2 x 4 tile in vector form, from the dots' int32 lane vectors: the 8 lane sums by
    a ``vphaddd`` tree (integer sums: any order gives the same values), then (dot - xsum) / xscale * wscale as
    two <4 x double> operations (IEEE division and product are correctly rounded in any lane: the scalar
    epilogue's bits). The scalar epilogue's 8 divisions alone took ~7 ns of a 166 ns tile at K = 2560 (one
    thread); this one takes the tile to ~162 ns."""
    b = e.b
    f64, f32 = ir.DoubleType(), ir.FloatType()
    v4f64 = ir.VectorType(f64, 4)
    ptr = _epilogue_operands(context, b, sig, args)

    def shuffle(a, c, idx):
        return b.shuffle_vector(a, c, ir.Constant(ir.VectorType(I32, len(idx)), idx))

    # lane k = 2c + r of the sums <- dots of (row r, token c)
    a = [lanes[k % 2][k // 2] for k in range(8)]
    h = [b.call(e.phadd, [a[2 * i], a[2 * i + 1]]) for i in range(4)]
    g = [b.call(e.phadd, [h[0], h[1]]), b.call(e.phadd, [h[2], h[3]])]      # per 128-bit half: 4 partial sums
    sums = b.add(shuffle(g[0], g[1], [0, 1, 2, 3, 8, 9, 10, 11]), shuffle(g[0], g[1], [4, 5, 6, 7, 12, 13, 14, 15]))
    t = [b.add(t0, ir.Constant(I64, c)) for c in range(4)]
    xsum = ir.Constant(ir.VectorType(I32, 8), None)
    scale = [ir.Constant(v4f64, None), ir.Constant(v4f64, None)]
    for c in range(4):
        xs = b.load(ptr("xsum", t[c]))
        sc = b.fpext(b.load(ptr("xscale", t[c])), f64)
        for r in range(2):
            xsum = b.insert_element(xsum, xs, ir.Constant(I32, 2 * c + r))
            scale[c // 2] = b.insert_element(scale[c // 2], sc, ir.Constant(I32, 2 * (c % 2) + r))
    ws = ir.Constant(v4f64, None)
    for r in range(2):
        w = b.fpext(b.load(ptr("wscale", b.add(n0, ir.Constant(I64, r)))), f64)
        for c in range(2):
            ws = b.insert_element(ws, w, ir.Constant(I32, 2 * c + r))
    # |dot - xsum| <= 512 K < 2^31 (ternary_matmul checks K): the int32 difference is exact
    diff = b.sub(sums, xsum)
    out_f32 = sig.args[7].dtype == types.float32
    for half in range(2):
        d = b.sitofp(shuffle(diff, diff, [4 * half, 4 * half + 1, 4 * half + 2, 4 * half + 3]), v4f64)
        v = b.fmul(b.fdiv(d, scale[half]), ws)
        for i in range(4):
            c, r = 2 * half + i // 2, i % 2
            val = b.extract_element(v, ir.Constant(I32, i))
            b.store(b.fptrunc(val, f32) if out_f32 else val, ptr("out", t[c], b.add(n0, ir.Constant(I64, r))))


def _tile_operands(context, builder, sig, args):
    """A tile's addresses (i64 values): (group, group stride, xp, xq's row stride, blocks) where ``group`` is the
    first byte of the row group holding weight row n0 (n0 % ROW_GROUP == 0: the group starts at packed row n0;
    the next group starts ``group stride`` bytes on, and block b of its row r at GROUP_BYTES * b + BLOCK_BYTES *
    r) and ``xp`` the first byte of token row t0."""
    (packed_t, xq_t), (packed, xq, n0, t0) = sig.args[:2], args[:4]
    pk = context.make_array(packed_t)(context, builder, packed)
    xa = context.make_array(xq_t)(context, builder, xq)
    pstride, xstride = cgutils.unpack_tuple(builder, pk.strides)[0], cgutils.unpack_tuple(builder, xa.strides)[0]
    nblk = builder.sdiv(cgutils.unpack_tuple(builder, xa.shape)[1], ir.Constant(I64, BLOCK))
    group = builder.add(builder.ptrtoint(pk.data, I64), builder.mul(n0, pstride))
    gstride = builder.mul(pstride, ir.Constant(I64, ROW_GROUP))
    xp = builder.add(builder.ptrtoint(xa.data, I64), builder.mul(t0, xstride))
    return group, gstride, xp, xstride, nblk


def _tile_codegen(R, C, prefetch, asm):
    def codegen(context, builder, sig, args):
        n0, t0 = args[2], args[3]
        e = _Emit(builder)
        wp, gstride, xp, xstride, nblk = _tile_operands(context, builder, sig, args)
        # row r of the tile is row r % G of the group r // G groups further on
        rows = [builder.add(builder.add(wp, builder.mul(gstride, ir.Constant(I64, r // ROW_GROUP))),
                            ir.Constant(I64, (r % ROW_GROUP) * BLOCK_BYTES)) for r in range(R)]
        if (R, C) == (2, 4):
            lanes = _emit_dots(e, rows, xp, xstride, nblk, R, C, prefetch, asm, lanes=True)
            _emit_epilogue_2x4(e, context, sig, args, lanes, n0, t0)
        else:
            dots = _emit_dots(e, rows, xp, xstride, nblk, R, C, prefetch, asm)
            _emit_epilogue(context, builder, sig, args, dots, R, C, n0, t0)
        return context.get_dummy_value()
    return codegen


def tile_intrinsic(codegen):
    """An intrinsic ``(packed, xq, n0, t0, xscale, xsum, wscale, out)`` (see ``ternary_matmul`` for the arguments)
    whose body ``codegen`` emits: a tile of weight rows from n0 (whole row groups) against token rows from t0
    over the whole K, epilogue included."""
    @intrinsic
    def tile(typingctx, packed, xq, n0, t0, xscale, xsum, wscale, out):
        arrays = (packed, xq, xscale, xsum, wscale, out)
        if not (all(isinstance(a, types.Array) for a in arrays) and isinstance(n0, types.Integer)
                and isinstance(t0, types.Integer)):
            return None
        want = ((packed, types.uint8, 2), (xq, types.int8, 2), (xscale, types.float32, 1),
                (xsum, types.int32, 1), (wscale, types.float32, 1))
        if any(a.dtype != dt or a.ndim != nd for a, dt, nd in want) or out.ndim != 2 \
                or out.dtype not in (types.float32, types.float64):
            return None
        sig = types.void(packed, xq, types.intp, types.intp, xscale, xsum, wscale, out)
        return sig, codegen
    return tile


def _tile(R, C, prefetch=PREFETCH, asm=True):
    """The AVX2 tile of weight rows [n0, n0 + R) (n0 and R multiples of ROW_GROUP) against token rows
    [t0, t0 + C), prefetching each group's stream ``prefetch`` bytes ahead. ``asm``: the inline-assembly block
    body (compute-bound tiles); else the IR one."""
    return tile_intrinsic(_tile_codegen(R, C, prefetch, asm))


_k21, _k22, _k23, _k24 = _tile(2, 1), _tile(2, 2), _tile(2, 3), _tile(2, 4)
_k21_t1 = _tile(2, 1, PREFETCH_T1, asm=False)


@njit(**JIT_EXACT)
def _row_pairs_avx2(C, packed, xq, n_lo, n_hi, t, xscale, xsum, wscale, out):
    """Token rows [t, t + C) (C <= 4) against weight rows [n_lo, n_hi) (n_lo even), a row group per call.
    Consecutive calls share the C token rows (in L1) and write along out's rows; an odd last row takes
    ``odd_row``."""
    n = n_lo
    while n + 2 <= n_hi:
        if C == 4:
            _k24(packed, xq, n, t, xscale, xsum, wscale, out)
        elif C == 3:
            _k23(packed, xq, n, t, xscale, xsum, wscale, out)
        elif C == 2:
            _k22(packed, xq, n, t, xscale, xsum, wscale, out)
        else:
            _k21(packed, xq, n, t, xscale, xsum, wscale, out)
        n += 2
    if n < n_hi:
        odd_row(C, packed, xq, n, t, xscale, xsum, wscale, out)


@njit(**JIT_EXACT)
def odd_row(C, packed, xq, n, t, xscale, xsum, wscale, out):
    """Weight row n (the last of an odd N: the first row of a group whose second is padding) against token rows
    [t, t + C) with the portable dot: no real model has one, and this saves compiling 1-row tiles."""
    nblk = xq.shape[1] // BLOCK
    for tt in range(t, t + C):
        out[tt, n] = _epilogue(_dot_portable(packed, n, xq[tt], nblk), xsum[tt], xscale[tt], wscale[n])


@njit(**JIT_EXACT_PARALLEL)
def _matmul_avx2(xq, xscale, xsum, packed, wscale, out):
    T = xq.shape[0]
    N = wscale.shape[0]
    for task in prange((N + TASK_ROWS - 1) // TASK_ROWS):
        n_lo = task * TASK_ROWS
        n_hi = min(N, n_lo + TASK_ROWS)
        if T == 1:              # decode of one stream: memory bound, one row group (one stream) per call
            n = n_lo
            while n + 2 <= n_hi:
                _k21_t1(packed, xq, n, 0, xscale, xsum, wscale, out)
                n += 2
            _row_pairs_avx2(1, packed, xq, n, n_hi, 0, xscale, xsum, wscale, out)
            continue
        # the task's weights (<= 110 KB) stay in L2 while 4 token rows at a time sweep over them
        for t in range(0, T, 4):
            _row_pairs_avx2(min(4, T - t), packed, xq, n_lo, n_hi, t, xscale, xsum, wscale, out)


# ---- portable kernel -------------------------------------------------------------------------------------

@njit(inline="always", **JIT_EXACT)
def _row_start(packed, n):
    """Offset of weight row n's first block in the flat bytes of ``packed`` (block b is GROUP_BYTES * b on)."""
    g = n % ROW_GROUP
    return (n - g) * packed.shape[1] + g * BLOCK_BYTES


@njit(**JIT_EXACT)
def _dot_portable(packed, n, x, nblk):
    """Weight row n . one token row (tails of the 2 x 2 tiles)."""
    flat = packed.reshape(packed.size)
    w0 = _row_start(packed, n)
    acc = 0
    for b in range(nblk):
        # a 32-byte slice indexed by the loop counter alone: the loop vectorises (a computed index would not)
        w = flat[w0 + GROUP_BYTES * b:w0 + GROUP_BYTES * b + BLOCK_BYTES]
        for m in range(BLOCK_BYTES):
            c = w[m]
            o = BLOCK * b + m
            acc += ((c >> 6) & 3) * x[o] + ((c >> 4) & 3) * x[o + 32] + ((c >> 2) & 3) * x[o + 64] + (c & 3) * x[o + 96]
    return acc


@njit(**JIT_EXACT)
def _dot2x2_portable(packed, n, x0, x1, nblk):
    """Weight rows n, n + 1 (n even: one row group) . two token rows; each code byte is unpacked once for both
    tokens."""
    flat = packed.reshape(packed.size)
    s0 = _row_start(packed, n)
    a00 = 0
    a01 = 0
    a10 = 0
    a11 = 0
    for b in range(nblk):
        w0 = flat[s0 + GROUP_BYTES * b:s0 + GROUP_BYTES * b + BLOCK_BYTES]
        w1 = flat[s0 + GROUP_BYTES * b + BLOCK_BYTES:s0 + GROUP_BYTES * b + 2 * BLOCK_BYTES]
        for m in range(BLOCK_BYTES):
            o = BLOCK * b + m
            c0 = w0[m]
            c1 = w1[m]
            d0, d1, d2, d3 = (c0 >> 6) & 3, (c0 >> 4) & 3, (c0 >> 2) & 3, c0 & 3
            e0, e1, e2, e3 = (c1 >> 6) & 3, (c1 >> 4) & 3, (c1 >> 2) & 3, c1 & 3
            p0, p1, p2, p3 = x0[o], x0[o + 32], x0[o + 64], x0[o + 96]
            q0, q1, q2, q3 = x1[o], x1[o + 32], x1[o + 64], x1[o + 96]
            a00 += d0 * p0 + d1 * p1 + d2 * p2 + d3 * p3
            a01 += d0 * q0 + d1 * q1 + d2 * q2 + d3 * q3
            a10 += e0 * p0 + e1 * p1 + e2 * p2 + e3 * p3
            a11 += e0 * q0 + e1 * q1 + e2 * q2 + e3 * q3
    return a00, a01, a10, a11


@njit(**JIT_EXACT_PARALLEL)
def _matmul_portable(xq, xscale, xsum, packed, wscale, out):
    T, Kp = xq.shape
    N = wscale.shape[0]
    nblk = Kp // BLOCK
    for task in prange((N + TASK_ROWS - 1) // TASK_ROWS):
        n_lo = task * TASK_ROWS
        n_hi = min(N, n_lo + TASK_ROWS)
        for t in range(0, T, 2):               # same order as the AVX2 kernel, tiles of 2 x 2
            for n in range(n_lo, n_hi, 2):
                if n + 1 < n_hi and t + 1 < T:
                    a00, a01, a10, a11 = _dot2x2_portable(packed, n, xq[t], xq[t + 1], nblk)
                    out[t, n] = _epilogue(a00, xsum[t], xscale[t], wscale[n])
                    out[t + 1, n] = _epilogue(a01, xsum[t + 1], xscale[t + 1], wscale[n])
                    out[t, n + 1] = _epilogue(a10, xsum[t], xscale[t], wscale[n + 1])
                    out[t + 1, n + 1] = _epilogue(a11, xsum[t + 1], xscale[t + 1], wscale[n + 1])
                else:
                    for nn in range(n, min(n + 2, n_hi)):
                        for tt in range(t, min(t + 2, T)):
                            out[tt, nn] = _epilogue(_dot_portable(packed, nn, xq[tt], nblk), xsum[tt], xscale[tt],
                                                    wscale[nn])


from .ternary_avx512 import _matmul_avx512  # noqa: E402  (it builds on the tiles and epilogues above)
from .ternary_amx import _matmul_amx  # noqa: E402  (it builds on the avx512 kernel)
