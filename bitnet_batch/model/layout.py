"""The kernels' ternary weight layout ("I2 blocks"; see ``jit_kernels.ternary``): pack, unpack, I2_S rows.

The layout is bitnet.cpp's x86 I2_S payload cut into rows (one row per output feature, K padded to a
multiple of 128 with code 1 = weight 0)::

    packed uint8 [N, Kp // 4]; block b of a row = bytes [32b, 32b + 32) = inputs [128b, 128b + 128)
    byte m of a block: bits 7-6 -> input 128b + m, 5-4 -> +32, 3-2 -> +64, 1-0 -> +96; code c = weight + 1

Both matmul kernels (AVX2 and portable) read this same layout, so an I2_S tensor whose input width is a
multiple of 128 needs no repacking at load (``from_i2s_rows`` returns its rows as they are).
"""
import numpy as np

from jit_kernels.ternary import BLOCK, BLOCK_BYTES


def padded(k: int) -> int:
    """Input width rounded up to a whole number of 128-input blocks."""
    return -(-k // BLOCK) * BLOCK


def pack_kernel(t: np.ndarray) -> np.ndarray:
    """int8 ternary [N, K] -> uint8 [N, Kp // 4] in I2-block order (padding codes = 1, i.e. weight 0)."""
    if t.ndim != 2:
        raise ValueError(f"pack_kernel: want a 2-D ternary matrix [N, K], got shape {t.shape}")
    n, k = t.shape
    kp = padded(k)
    codes = np.ones((n, kp), dtype=np.uint8)
    codes[:, :k] = (t + 1).astype(np.uint8)
    c = codes.reshape(n, kp // BLOCK, 4, 32)          # [row, block, group j (bits 7-6 .. 1-0), byte m]
    out = (c[:, :, 0] << 6) | (c[:, :, 1] << 4) | (c[:, :, 2] << 2) | c[:, :, 3]
    return np.ascontiguousarray(out.reshape(n, kp // 4))


def unpack_kernel(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack_kernel (tests and inspection): uint8 [N, Kp // 4] -> int8 [N, k].

    Code 3 (never written by bitnet.cpp's quantizer) decodes to 0 here, as bitnet.cpp's dequantizer does;
    the matmul kernels multiply it as 3, as bitnet.cpp's own dot product does."""
    n, kb = packed.shape
    p = packed.reshape(n, kb // 32, 1, 32)
    c = np.concatenate([(p >> s) & 3 for s in (6, 4, 2, 0)], axis=2).reshape(n, kb * 4)
    t = c.astype(np.int8) - 1
    t[c == 3] = 0
    return t[:, :k]


def from_i2s_rows(payload: np.ndarray) -> np.ndarray:
    """I2_S x86 payload rows uint8 [N, K/4] (``raw[:ne // 4].reshape(N, K // 4)``, K a multiple of 128) ->
    kernel layout uint8 [N, K/4].

    The kernel layout is the I2_S x86 layout, so this is the identity: a C-contiguous payload is returned
    as is (no copy; it may stay a read-only view of the memory-mapped file), anything else is copied once."""
    if not isinstance(payload, np.ndarray) or payload.dtype != np.uint8 or payload.ndim != 2:
        what = f"{payload.dtype} {payload.shape}" if isinstance(payload, np.ndarray) else type(payload).__name__
        raise ValueError(f"from_i2s_rows: want uint8 rows [N, K/4], got {what}")
    if payload.shape[1] % BLOCK_BYTES:
        raise ValueError(f"from_i2s_rows: row width {payload.shape[1]} bytes is not a whole number of "
                         f"{BLOCK_BYTES}-byte blocks (K = {payload.shape[1] * 4} is not a multiple of {BLOCK})")
    return np.ascontiguousarray(payload)
