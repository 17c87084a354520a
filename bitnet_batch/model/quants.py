"""Ternary codecs (I2_S, TQ2_0, TQ1_0) and float tensor decoding, vectorised with numpy.

They run once at load or write time, so clarity beats speed. Conventions everywhere:

* A ternary value t is in {-1, 0, +1}; the stored code is c = t + 1 in {0, 1, 2}; code 3 decodes to 0.
* ``ne0`` = row length (in_features, the fastest axis in the file), ``ne1`` = number of rows (out_features).
  Unpacked arrays are numpy row-major ``[ne1, ne0]``.

Layouts (``docs/model.md`` section 3):

* I2_S (bitnet.cpp x86): the flat tensor in blocks of 128 values -> 32 bytes; byte m of a block holds
  values m (bits 7-6), m+32 (5-4), m+64 (3-2), m+96 (1-0). Then one fp32 scale at byte ne/4 and 28 zero
  bytes: ne/4 + 32 bytes in all.
* TQ2_0: blocks of 256 = qs[64] + fp16 d (66 B). Each 128-value half (qs bytes j..j+31, j in {0, 32})
  holds values m (bits 1-0), m+32 (3-2), m+64 (5-4), m+96 (7-6) in byte j+m: LSB first, unlike I2_S.
* TQ1_0: blocks of 256 = qs[48] + qh[4] + fp16 d (54 B). Base 3, most significant trit first, stored as
  the fixed-point fraction ceil(v * 256 / 243) (llama.cpp ``quantize_row_tq1_0_ref``):
  qs[0..31]  byte m = trits of x[m + 32n],       n = 0..4   -> values 0..159
  qs[32..47] byte m = trits of x[160 + m + 16n], n = 0..4   -> values 160..239
  qh[0..3]   byte j = trits of x[240 + j + 4n],  n = 0..3, times 3 (top-aligned) -> values 240..255
  Trit n of byte b is ((b * 3^n mod 256) * 3) >> 8.
"""
from __future__ import annotations

import numpy as np

from .gguf import GGMLType, I2S_BLOCK, I2S_TAIL

QK_K = 256                                   # TQ1_0 / TQ2_0 block length
TQ2_0_BYTES = 66
TQ1_0_BYTES = 54
_DECODE = np.array([-1, 0, 1, 0], dtype=np.int8)          # code -> ternary value
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


# ---- validation ----------------------------------------------------------------------------------------

def _check_raw(raw: np.ndarray, expected: int, what: str) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"{what}: raw data must be a 1-D uint8 array, got {raw.dtype} with shape {raw.shape}")
    if raw.size != expected:
        raise ValueError(f"{what}: raw data has {raw.size} bytes, expected {expected}")
    return raw


def _check_dims(ne0: int, ne1: int, block: int, what: str, flat: bool = False) -> None:
    if ne0 <= 0 or ne1 <= 0:
        raise ValueError(f"{what}: dimensions must be positive, got ne0={ne0}, ne1={ne1}")
    n = ne0 * ne1 if flat else ne0
    if n % block:
        label = "ne0*ne1" if flat else "ne0"
        raise ValueError(f"{what}: {label}={n} is not a multiple of the block size {block}")


def _check_ternary(t: np.ndarray, what: str) -> np.ndarray:
    """-> int8 [ne1, ne0]. 1-D input is one row."""
    t = np.asarray(t)
    if t.ndim == 1:
        t = t[None, :]
    if t.ndim != 2:
        raise ValueError(f"{what}: ternary values must be 1-D or 2-D [ne1, ne0], got shape {t.shape}")
    if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
        raise ValueError(f"{what}: ternary values must be integers in {{-1, 0, 1}}, got dtype {t.dtype}")
    if t.size and (t.min() < -1 or t.max() > 1 or (t.dtype.kind == "f" and np.any(t != np.round(t)))):
        raise ValueError(f"{what}: values must be in {{-1, 0, 1}}, found range [{t.min()}, {t.max()}]")
    return t.astype(np.int8, copy=False)


def _codes(t: np.ndarray) -> np.ndarray:
    return (t.astype(np.int16) + 1).astype(np.uint8)


def _block_scales(d, ne1: int, n_blocks: int, what: str) -> np.ndarray:
    """Scalar or [ne1, n_blocks] -> float16 [ne1, n_blocks]."""
    d = np.asarray(d, dtype=np.float32)
    if d.ndim == 0:
        d = np.full((ne1, n_blocks), d, dtype=np.float32)
    if d.shape != (ne1, n_blocks):
        raise ValueError(f"{what}: d must be a scalar or shape {(ne1, n_blocks)}, got {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"{what}: d must be finite")
    return d.astype(np.float16)


# ---- I2_S -----------------------------------------------------------------------------------------------

def unpack_i2s(raw: np.ndarray, ne0: int, ne1: int) -> tuple[np.ndarray, float]:
    """I2_S bytes (ne/4 + 32) -> (int8 ternary [ne1, ne0], fp32 per-tensor scale)."""
    _check_dims(ne0, ne1, I2S_BLOCK, "I2_S", flat=True)
    n = ne0 * ne1
    raw = _check_raw(raw, n // 4 + I2S_TAIL, "I2_S")
    blocks = raw[: n // 4].reshape(-1, 1, 32)                       # [block, 1, byte m]
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)
    codes = (blocks >> shifts) & 3                                  # [block, group g, m] = value g*32 + m
    scale = float(raw[n // 4: n // 4 + 4].view("<f4")[0])
    return _DECODE[codes].reshape(ne1, ne0), scale


def pack_i2s(t: np.ndarray, scale: float) -> np.ndarray:
    """int8 ternary [ne1, ne0] (flat size a multiple of 128) + scale -> uint8 [ne/4 + 32]."""
    t = _check_ternary(t, "I2_S")
    _check_dims(t.shape[1], t.shape[0], I2S_BLOCK, "I2_S", flat=True)
    if not np.isfinite(scale):
        raise ValueError(f"I2_S: scale must be finite, got {scale}")
    n = t.size
    c = _codes(t).reshape(-1, 4, 32)                                # [block, group, m]
    out = np.zeros(n // 4 + I2S_TAIL, dtype=np.uint8)
    out[: n // 4] = ((c[:, 0] << 6) | (c[:, 1] << 4) | (c[:, 2] << 2) | c[:, 3]).reshape(-1)
    out[n // 4: n // 4 + 4] = np.array([scale], dtype="<f4").view(np.uint8)
    return out


# ---- TQ2_0 ----------------------------------------------------------------------------------------------

def unpack_tq2_0(raw: np.ndarray, ne0: int, ne1: int) -> tuple[np.ndarray, np.ndarray]:
    """TQ2_0 bytes -> (int8 ternary [ne1, ne0], float32 d [ne1, ne0 // 256])."""
    _check_dims(ne0, ne1, QK_K, "TQ2_0")
    nb = ne0 // QK_K
    raw = _check_raw(raw, ne1 * nb * TQ2_0_BYTES, "TQ2_0")
    blocks = raw.reshape(ne1 * nb, TQ2_0_BYTES)
    qs = blocks[:, :64].reshape(-1, 2, 1, 32)                       # [block, half, 1, byte m]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = (qs >> shifts) & 3                                      # [block, half, n, m] = value half*128+n*32+m
    d = blocks[:, 64:66].copy().view("<f2").astype(np.float32).reshape(ne1, nb)
    return _DECODE[codes].reshape(ne1, ne0), d


def pack_tq2_0(t: np.ndarray, d) -> np.ndarray:
    """int8 ternary [ne1, ne0] + d (scalar or [ne1, ne0 // 256], stored as fp16) -> TQ2_0 bytes."""
    t = _check_ternary(t, "TQ2_0")
    ne1, ne0 = t.shape
    _check_dims(ne0, ne1, QK_K, "TQ2_0")
    nb = ne0 // QK_K
    d16 = _block_scales(d, ne1, nb, "TQ2_0")
    c = _codes(t).reshape(ne1 * nb, 2, 4, 32)                       # [block, half, n, m]
    qs = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    out = np.empty((ne1 * nb, TQ2_0_BYTES), dtype=np.uint8)
    out[:, :64] = qs.reshape(-1, 64)
    out[:, 64:66] = d16.reshape(-1, 1).view(np.uint8)
    return out.reshape(-1)


# ---- TQ1_0 ----------------------------------------------------------------------------------------------

def _trits(b: np.ndarray, n_trits: int) -> np.ndarray:
    """uint8 [...] -> codes uint8 [..., n_trits], most significant trit first."""
    q = b[..., None] * _POW3[:n_trits]                               # uint8 wrap-around is intended
    return ((q.astype(np.uint16) * 3) >> 8).astype(np.uint8)


def _pack_trits(c: np.ndarray) -> np.ndarray:
    """codes uint8 [..., 5] (most significant first) -> fixed-point bytes ceil(v * 256 / 243)."""
    v = np.zeros(c.shape[:-1], dtype=np.uint16)
    for k in range(c.shape[-1]):
        v = v * 3 + c[..., k]
    return ((v * 256 + 242) // 243).astype(np.uint8)


def unpack_tq1_0(raw: np.ndarray, ne0: int, ne1: int) -> tuple[np.ndarray, np.ndarray]:
    """TQ1_0 bytes -> (int8 ternary [ne1, ne0], float32 d [ne1, ne0 // 256])."""
    _check_dims(ne0, ne1, QK_K, "TQ1_0")
    nb = ne0 // QK_K
    raw = _check_raw(raw, ne1 * nb * TQ1_0_BYTES, "TQ1_0")
    blocks = raw.reshape(ne1 * nb, TQ1_0_BYTES)
    a = _trits(blocks[:, :32], 5).transpose(0, 2, 1)                # [block, n, m] = value m + 32n
    b = _trits(blocks[:, 32:48], 5).transpose(0, 2, 1)              # [block, n, m] = value 160 + m + 16n
    h = _trits(blocks[:, 48:52], 4).transpose(0, 2, 1)              # [block, n, j] = value 240 + j + 4n
    codes = np.concatenate([a.reshape(-1, 160), b.reshape(-1, 80), h.reshape(-1, 16)], axis=1)
    d = blocks[:, 52:54].copy().view("<f2").astype(np.float32).reshape(ne1, nb)
    return _DECODE[codes].reshape(ne1, ne0), d


def pack_tq1_0(t: np.ndarray, d) -> np.ndarray:
    """int8 ternary [ne1, ne0] + d (scalar or [ne1, ne0 // 256], stored as fp16) -> TQ1_0 bytes."""
    t = _check_ternary(t, "TQ1_0")
    ne1, ne0 = t.shape
    _check_dims(ne0, ne1, QK_K, "TQ1_0")
    nb = ne0 // QK_K
    d16 = _block_scales(d, ne1, nb, "TQ1_0")
    c = _codes(t).reshape(ne1 * nb, QK_K)
    out = np.empty((ne1 * nb, TQ1_0_BYTES), dtype=np.uint8)
    out[:, :32] = _pack_trits(c[:, :160].reshape(-1, 5, 32).transpose(0, 2, 1))
    out[:, 32:48] = _pack_trits(c[:, 160:240].reshape(-1, 5, 16).transpose(0, 2, 1))
    # qh: 4 trits, then one more x3 so that the first trit is the most significant of 5.
    h = np.concatenate([c[:, 240:].reshape(-1, 4, 4).transpose(0, 2, 1),
                        np.zeros((ne1 * nb, 4, 1), np.uint8)], axis=2)
    out[:, 48:52] = _pack_trits(h)
    out[:, 52:54] = d16.reshape(-1, 1).view(np.uint8)
    return out.reshape(-1)


# ---- float tensors --------------------------------------------------------------------------------------

def float_tensor(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """F32 / F16 / BF16 bytes -> float32 array in numpy order (ggml shape reversed: [ne1, ne0] for 2-D).

    F32 is returned as a view of ``raw`` when it is suitably aligned (read-only if raw is)."""
    shape = tuple(int(n) for n in shape)
    np_shape = shape[::-1]
    n = int(np.prod(shape, dtype=np.int64))
    if ggml_type == GGMLType.F32:
        itemsize = 4
    elif ggml_type in (GGMLType.F16, GGMLType.BF16):
        itemsize = 2
    else:
        raise ValueError(f"float_tensor: type id {int(ggml_type)} is not F32, F16 or BF16")
    raw = _check_raw(raw, n * itemsize, GGMLType(ggml_type).name)
    if ggml_type == GGMLType.F32:
        return raw.view("<f4").reshape(np_shape)
    if ggml_type == GGMLType.F16:
        return raw.view("<f2").astype(np.float32).reshape(np_shape)
    # BF16 = the top 16 bits of an fp32.
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(np_shape)
