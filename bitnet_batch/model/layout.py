"""The kernels' ternary weight layout ("I2 blocks, rows in pairs"; see ``jit_kernels.ternary``): pack, unpack,
I2_S rows.

A row's codes are bitnet.cpp's x86 I2_S payload (one row per output feature, K padded to a multiple of 128
with code 1 = weight 0)::

    block b of a row = 32 bytes holding inputs [128b, 128b + 128)
    byte m of a block: bits 7-6 -> input 128b + m, 5-4 -> +32, 3-2 -> +64, 1-0 -> +96; code c = weight + 1

and rows are stored in groups of ``ROW_GROUP`` = 2, block-interleaved: group g (rows 2g, 2g + 1) is one run of
bytes in which block b of row 2g + r sits at offset 64b + 32r. ``packed`` is uint8 [Np, Kp // 4] with Np = N
rounded up to a multiple of 2 (a padding row: all code 1, never read into an output); group g is rows
[2g, 2g + 2) of it, so a slice of whole groups is again a packed matrix. A one-token (decode) tile then reads
one sequential stream per row pair (see ``jit_kernels.ternary`` for what that gains).
"""
import numpy as np

from jit_kernels.buffers import aligned_empty
from jit_kernels.ternary import BLOCK, BLOCK_BYTES, ROW_GROUP, padded_rows

PAD_BYTE = 0x55          # four codes 1 (weight 0)


def padded(k: int) -> int:
    """Input width rounded up to a whole number of 128-input blocks."""
    return -(-k // BLOCK) * BLOCK


def part_starts(sizes) -> tuple[tuple[int, ...], int]:
    """Parts of ``sizes`` rows stacked in one packed matrix, each starting a row group: (their first rows, the
    matrix's rows). The loader's fused projections and the workspace blocks that hold their outputs."""
    starts, row = [], 0
    for n in sizes:
        starts.append(row)
        row += padded_rows(n)
    return tuple(starts), row


def interleave_rows(rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """I2-block rows uint8 [N, KB] (KB a multiple of 32) -> the kernel layout uint8 [padded_rows(N), KB],
    written into ``out`` (C-contiguous, that shape) when given; returns it."""
    n, kb = rows.shape
    if kb % BLOCK_BYTES:
        raise ValueError(f"interleave_rows: row width {kb} bytes is not a whole number of {BLOCK_BYTES}-byte blocks")
    np_ = padded_rows(n)
    if out is None:
        out = aligned_empty((np_, kb), np.uint8)
    elif out.shape != (np_, kb) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"interleave_rows: out must be C-contiguous uint8 {(np_, kb)}, got {out.dtype} {out.shape}")
    dst = out.reshape(np_ // ROW_GROUP, kb // BLOCK_BYTES, ROW_GROUP, BLOCK_BYTES)     # [group, block, row, byte]
    whole = n - n % ROW_GROUP
    dst[:whole // ROW_GROUP] = rows[:whole].reshape(-1, ROW_GROUP, kb // BLOCK_BYTES, BLOCK_BYTES).transpose(0, 2, 1, 3)
    if whole < n:                                 # a last group partly filled: the rest are padding rows
        tail = np.full((ROW_GROUP, kb), PAD_BYTE, np.uint8)
        tail[:n - whole] = rows[whole:]
        dst[-1] = tail.reshape(ROW_GROUP, kb // BLOCK_BYTES, BLOCK_BYTES).transpose(1, 0, 2)
    return out


def deinterleave_rows(packed: np.ndarray, n: int | None = None) -> np.ndarray:
    """Inverse of ``interleave_rows``: the kernel layout -> I2-block rows uint8 [n, KB] (n default: all rows)."""
    np_, kb = packed.shape
    if np_ % ROW_GROUP:
        raise ValueError(f"deinterleave_rows: {np_} rows is not a whole number of {ROW_GROUP}-row groups")
    g = np.ascontiguousarray(packed).reshape(np_ // ROW_GROUP, kb // BLOCK_BYTES, ROW_GROUP, BLOCK_BYTES)
    return np.ascontiguousarray(g.transpose(0, 2, 1, 3)).reshape(np_, kb)[:np_ if n is None else n]


def pack_rows(t: np.ndarray) -> np.ndarray:
    """int8 ternary [N, K] -> its I2-block rows uint8 [N, Kp // 4], not yet grouped (padding codes = 1, i.e.
    weight 0)."""
    if t.ndim != 2:
        raise ValueError(f"pack_rows: want a 2-D ternary matrix [N, K], got shape {t.shape}")
    n, k = t.shape
    kp = padded(k)
    codes = np.ones((n, kp), dtype=np.uint8)
    codes[:, :k] = (t + 1).astype(np.uint8)
    c = codes.reshape(n, kp // BLOCK, 4, 32)          # [row, block, group j (bits 7-6 .. 1-0), byte m]
    out = (c[:, :, 0] << 6) | (c[:, :, 1] << 4) | (c[:, :, 2] << 2) | c[:, :, 3]
    return out.reshape(n, kp // 4).astype(np.uint8, copy=False)     # uint8 already: no second copy


def pack_kernel(t: np.ndarray) -> np.ndarray:
    """int8 ternary [N, K] -> uint8 [padded_rows(N), Kp // 4] in the kernel layout (padding codes = 1, i.e.
    weight 0)."""
    return interleave_rows(pack_rows(t))


def unpack_kernel(packed: np.ndarray, k: int, n: int | None = None) -> np.ndarray:
    """Inverse of pack_kernel (tests and inspection): uint8 [Np, Kp // 4] -> int8 [n, k] (n default: Np).

    Code 3 (never written by bitnet.cpp's quantizer) decodes to 0 here, as bitnet.cpp's dequantizer does;
    the matmul kernels multiply it as 3, as bitnet.cpp's own dot product does."""
    rows = deinterleave_rows(packed, n)
    n, kb = rows.shape
    p = rows.reshape(n, kb // 32, 1, 32)
    c = np.concatenate([(p >> s) & 3 for s in (6, 4, 2, 0)], axis=2).reshape(n, kb * 4)
    t = c.astype(np.int8) - 1
    t[c == 3] = 0
    return t[:, :k]


def from_i2s_rows(payload: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """I2_S x86 payload rows uint8 [N, K/4] (``raw[:ne // 4].reshape(N, K // 4)``, K a multiple of 128) ->
    kernel layout uint8 [padded_rows(N), K/4] (into ``out`` when given, as ``interleave_rows``): the rows are
    I2 blocks already, only grouped (one copy)."""
    if not isinstance(payload, np.ndarray) or payload.dtype != np.uint8 or payload.ndim != 2:
        what = f"{payload.dtype} {payload.shape}" if isinstance(payload, np.ndarray) else type(payload).__name__
        raise ValueError(f"from_i2s_rows: want uint8 rows [N, K/4], got {what}")
    if payload.shape[1] % BLOCK_BYTES:
        raise ValueError(f"from_i2s_rows: row width {payload.shape[1]} bytes is not a whole number of "
                         f"{BLOCK_BYTES}-byte blocks (K = {payload.shape[1] * 4} is not a multiple of {BLOCK})")
    return interleave_rows(payload, out)
