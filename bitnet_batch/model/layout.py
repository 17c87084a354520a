"""The kernels' ternary weight layout ("I2 blocks"; see ``jit_kernels.ternary``): pack and unpack."""
import numpy as np

from jit_kernels.ternary import BLOCK


def padded(k: int) -> int:
    return -(-k // BLOCK) * BLOCK


def pack_kernel(t: np.ndarray) -> np.ndarray:
    """int8 ternary [N, K] -> uint8 [N, Kp // 4] in I2-block order (padding codes = 1, i.e. weight 0)."""
    n, k = t.shape
    kp = padded(k)
    codes = np.ones((n, kp), dtype=np.uint8)
    codes[:, :k] = (t + 1).astype(np.uint8)
    c = codes.reshape(n, kp // BLOCK, 4, 32)          # [row, block, group j (bits 7-6 .. 1-0), byte m]
    out = (c[:, :, 0] << 6) | (c[:, :, 1] << 4) | (c[:, :, 2] << 2) | c[:, :, 3]
    return np.ascontiguousarray(out.reshape(n, kp // 4))


def unpack_kernel(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack_kernel (tests and inspection): uint8 [N, Kp // 4] -> int8 [N, k]."""
    n, kb = packed.shape
    p = packed.reshape(n, kb // 32, 1, 32)
    c = np.concatenate([(p >> s) & 3 for s in (6, 4, 2, 0)], axis=2).reshape(n, kb * 4)
    t = c.astype(np.int8) - 1
    t[c == 3] = 0
    return t[:, :k]
