"""A minimal GGUF v3 writer (ours, so that it can write bitnet.cpp's I2_S = type 36).

Usage::

    w = GGUFWriter()
    w.add_kv("general.architecture", "bitnet-b1.58")
    w.add_tensor("blk.0.attn_q.weight", lambda: pack_i2s(t, scale), (2560, 2560), GGMLType.I2_S)
    w.write("model.gguf")

Tensor data is streamed: ``add_tensor`` accepts an array or a callable that produces the tensor's bytes
when ``write`` reaches it (an array, or an iterable of arrays written one after another), so a
1.2 GB model is written while holding only one tensor (or one chunk) in memory.
The layout is described in ``bitnet_batch/model/gguf.py``.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Union

import numpy as np

from ..model.gguf import (DEFAULT_ALIGNMENT, GGUF_MAGIC, KEY_ALIGNMENT, SCALAR_DTYPES, GGMLType, GGUFValueType,
                          tensor_nbytes)

TensorData = Union[np.ndarray, Callable[[], Union[np.ndarray, Iterable[np.ndarray]]]]
_FLOAT_DTYPES = {GGMLType.F32: np.dtype("<f4"), GGMLType.F16: np.dtype("<f2")}
_NUMPY_VALUE_TYPES = {np.dtype(v): k for k, v in [
    (GGUFValueType.UINT8, "u1"), (GGUFValueType.INT8, "i1"), (GGUFValueType.UINT16, "u2"),
    (GGUFValueType.INT16, "i2"), (GGUFValueType.UINT32, "u4"), (GGUFValueType.INT32, "i4"),
    (GGUFValueType.FLOAT32, "f4"), (GGUFValueType.BOOL, "?"), (GGUFValueType.UINT64, "u8"),
    (GGUFValueType.INT64, "i8"), (GGUFValueType.FLOAT64, "f8")]}


@dataclass(frozen=True)
class _KV:
    key: str
    vtype: GGUFValueType
    etype: GGUFValueType | None      # element type when vtype is ARRAY
    value: Any


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]           # ggml order (ne0 first)
    ggml_type: int
    nbytes: int
    data: TensorData


def _infer_scalar_type(value) -> GGUFValueType:
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if 0 <= v < 2**32:
            return GGUFValueType.UINT32
        if -2**31 <= v < 0:
            return GGUFValueType.INT32
        return GGUFValueType.UINT64 if v > 0 else GGUFValueType.INT64
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    raise TypeError(f"cannot infer a GGUF type for {type(value).__name__} value {value!r}")


def _infer_array_type(value) -> GGUFValueType:
    if isinstance(value, np.ndarray):
        if value.dtype not in _NUMPY_VALUE_TYPES:
            raise TypeError(f"no GGUF array type for numpy dtype {value.dtype}")
        return _NUMPY_VALUE_TYPES[value.dtype]
    if len(value) == 0:
        raise TypeError("cannot infer the element type of an empty list: pass value_type")
    if all(isinstance(v, str) for v in value):
        return GGUFValueType.STRING
    if all(isinstance(v, (bool, np.bool_)) for v in value):
        return GGUFValueType.BOOL
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        return GGUFValueType.INT32
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in value):
        return GGUFValueType.FLOAT32
    raise TypeError("list values must be all str, all bool, all int or all numbers")


def _encode_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _encode_scalar(vtype: GGUFValueType, value) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _encode_string(value)
    return np.array([value], dtype=SCALAR_DTYPES[vtype]).tobytes()


def _encode_array(etype: GGUFValueType, value) -> bytes:
    head = struct.pack("<IQ", int(etype), len(value))
    if etype == GGUFValueType.STRING:
        return head + b"".join(_encode_string(s) for s in value)
    if etype == GGUFValueType.ARRAY:
        raise TypeError("nested arrays are not supported by this writer")
    return head + np.asarray(value).astype(SCALAR_DTYPES[etype], copy=False).tobytes()


class GGUFWriter:
    """Collects metadata and tensor descriptions; ``write(path)`` streams the file."""

    def __init__(self, alignment: int = DEFAULT_ALIGNMENT):
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a positive power of two, got {alignment}")
        self.alignment = alignment
        self._kvs: dict[str, _KV] = {}
        self._tensors: dict[str, _Tensor] = {}
        if alignment != DEFAULT_ALIGNMENT:
            self.add_kv(KEY_ALIGNMENT, alignment, GGUFValueType.UINT32)

    def add_kv(self, key: str, value, value_type: GGUFValueType | int | None = None) -> None:
        """Add one metadata entry. For lists/arrays ``value_type`` is the element type.

        Inferred: str -> STRING, bool -> BOOL, int -> UINT32 (INT32/64 if negative, UINT64 if large),
        float -> FLOAT32, list[str] -> array of STRING, list of ints -> array of INT32, list of numbers ->
        array of FLOAT32, numpy array -> array of its dtype.
        """
        if key in self._kvs:
            raise ValueError(f"duplicate metadata key '{key}'")
        if key == KEY_ALIGNMENT:
            self.alignment = int(value)
        if isinstance(value, (list, tuple, np.ndarray)):
            etype = GGUFValueType(value_type) if value_type is not None else _infer_array_type(value)
            self._kvs[key] = _KV(key, GGUFValueType.ARRAY, etype, value)
        else:
            vtype = GGUFValueType(value_type) if value_type is not None else _infer_scalar_type(value)
            if vtype == GGUFValueType.ARRAY:
                raise TypeError(f"'{key}': value_type ARRAY needs a list or array value")
            self._kvs[key] = _KV(key, vtype, None, value)

    def add_tensor(self, name: str, data: TensorData, shape: tuple[int, ...], ggml_type: int) -> None:
        """Add a tensor. ``shape`` is in ggml order (ne0 first). ``data`` is raw uint8 bytes, or (F32/F16/
        BF16 only) a float array, or a callable returning either (or an iterable of chunks of them)."""
        if name in self._tensors:
            raise ValueError(f"duplicate tensor name '{name}'")
        shape = tuple(int(n) for n in shape)
        nbytes = tensor_nbytes(ggml_type, shape)                # validates type and shape
        if isinstance(data, np.ndarray):
            nb = self._as_bytes(name, data, ggml_type).size
            if nb != nbytes:
                raise ValueError(f"tensor '{name}': data has {nb} bytes, shape {shape} of "
                                 f"{GGMLType(ggml_type).name} needs {nbytes}")
        self._tensors[name] = _Tensor(name, shape, int(ggml_type), nbytes, data)

    @staticmethod
    def _as_bytes(name: str, chunk: np.ndarray, ggml_type: int) -> np.ndarray:
        """One chunk of tensor data -> flat uint8 (floats are converted to the tensor type)."""
        chunk = np.asarray(chunk)
        if chunk.dtype == np.uint8:
            return chunk.reshape(-1)
        if chunk.dtype.kind != "f":
            raise TypeError(f"tensor '{name}': data must be uint8 bytes or floats, got {chunk.dtype}")
        if ggml_type in _FLOAT_DTYPES:
            return np.ascontiguousarray(chunk, dtype=_FLOAT_DTYPES[ggml_type]).reshape(-1).view(np.uint8)
        if ggml_type == GGMLType.BF16:
            bits = np.ascontiguousarray(chunk, dtype="<f4").view("<u4")
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16   # round to nearest even
            return rounded.astype("<u2").reshape(-1).view(np.uint8)
        raise TypeError(f"tensor '{name}': float data given for type {GGMLType(ggml_type).name}; pass packed bytes")

    # ---- writing -------------------------------------------------------------------------------------

    def _header(self) -> bytes:
        """Header + KVs + tensor infos, unpadded. Tensor offsets are relative to the data section."""
        parts = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(self._tensors), len(self._kvs))]
        for kv in self._kvs.values():
            parts.append(_encode_string(kv.key) + struct.pack("<I", int(kv.vtype)))
            if kv.vtype == GGUFValueType.ARRAY:
                parts.append(_encode_array(kv.etype, kv.value))
            else:
                parts.append(_encode_scalar(kv.vtype, kv.value))
        pos = 0
        for t in self._tensors.values():
            parts.append(_encode_string(t.name) + struct.pack("<I", len(t.shape)))
            parts.append(struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<IQ", t.ggml_type, pos))
            pos = self._align(pos + t.nbytes)
        return b"".join(parts)

    def _align(self, n: int) -> int:
        return -(-n // self.alignment) * self.alignment

    def _chunks(self, t: _Tensor) -> Iterable[np.ndarray]:
        data = t.data() if callable(t.data) else t.data
        if isinstance(data, np.ndarray):
            data = (data,)
        for chunk in data:
            yield self._as_bytes(t.name, chunk, t.ggml_type)

    def write(self, path: str | os.PathLike) -> None:
        """Write the file, producing each tensor's data only when it is written. A failed write leaves
        no partial file behind."""
        header = self._header()
        try:
            with open(path, "wb") as f:
                f.write(header)
                f.write(b"\0" * (self._align(len(header)) - len(header)))
                for t in self._tensors.values():
                    self._write_tensor(f, t)
        except BaseException:
            if os.path.exists(path):
                os.unlink(path)
            raise

    def _write_tensor(self, f, t: _Tensor) -> None:
        written = 0
        for chunk in self._chunks(t):
            written += chunk.size
            if written > t.nbytes:
                break
            f.write(chunk.data)                 # chunk is contiguous uint8: no copy
        if written != t.nbytes:
            raise ValueError(f"tensor '{t.name}': producer gave {written} bytes or more, expected {t.nbytes}"
                             if written > t.nbytes else
                             f"tensor '{t.name}': producer gave {written} bytes, expected {t.nbytes}")
        f.write(b"\0" * (self._align(t.nbytes) - t.nbytes))
