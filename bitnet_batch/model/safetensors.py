"""A small read-only safetensors reader: header, tensor infos, and a memory map of the data (numpy only).

File layout (https://github.com/huggingface/safetensors, little-endian)::

    header_len u64 | header: JSON object of header_len bytes (UTF-8, may be space-padded)
    data: the tensors' bytes back to back; each tensor is [begin, end) of this buffer

    header = {"__metadata__": {str: str} (optional),
              NAME: {"dtype": "BF16" | "F16" | "F32" | "U8" | ..., "shape": [d0, d1, ...],
                     "data_offsets": [begin, end]}}

Shapes are numpy (row-major) order: a torch ``[out_features, in_features]`` weight is ``shape = [out, in]``.
numpy has no bfloat16: BF16 tensors are returned as uint16 bit patterns (``float32`` widens them).
Every problem is a ``ModelFormatError(path, problem, tensor=...)``; nothing is read before the header has
been checked against the file size, and tensor data is only memory-mapped (``release`` drops copied pages).
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import ModelFormatError, ModelNotFoundError
from .gguf import release_mapped_range

MAX_HEADER_BYTES = 100 * 2**20        # the reference implementation's limit

# safetensors dtype -> numpy dtype of the stored bytes (BF16 as its uint16 bits)
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "U8": np.dtype("u1"), "I8": np.dtype("i1"), "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"), "F32": np.dtype("<f4"), "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file."""
    name: str
    dtype: str                  # safetensors dtype name ("BF16", "U8", ...)
    shape: tuple[int, ...]      # numpy order
    offset: int                 # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """A parsed safetensors file. ``tensors``: name -> TensorInfo (file order); ``metadata``: the optional
    ``__metadata__`` strings; ``array(name)`` is a read-only view of the memory map (no copy)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            self.file_size = self.path.stat().st_size
        except FileNotFoundError:
            raise ModelNotFoundError(f"{self.path}: no such file") from None
        except OSError as e:
            raise ModelFormatError(self.path, f"cannot open: {e.strerror}") from None
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                self._fail(f"truncated header: the file has only {self.file_size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, self.file_size - 8):
                self._fail(f"header length {n} exceeds the {self.file_size - 8} bytes after it (truncated, "
                           "or not a safetensors file)")
            raw = f.read(n)
        self.data_offset = 8 + n
        self._parse(raw)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r") if self.file_size > self.data_offset else None

    def _fail(self, problem: str, tensor: str | None = None):
        raise ModelFormatError(self.path, problem, tensor=tensor)

    def _parse(self, raw: bytes) -> None:
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._fail(f"header is not valid JSON ({e}); not a safetensors file?")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            self._fail("__metadata__ must be an object of strings")
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        data_len = self.file_size - self.data_offset
        spans = []
        for name, entry in header.items():
            info = self._tensor_info(name, entry, data_len)
            self.tensors[name] = info
            spans.append((info.offset, info.offset + info.nbytes, name))
        spans.sort()
        for (_, end, prev), (start, _, name) in zip(spans, spans[1:]):
            if start < end:
                self._fail(f"data overlaps tensor '{prev}'", tensor=name)

    def _tensor_info(self, name: str, entry, data_len: int) -> TensorInfo:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            self._fail("header entry must have dtype, shape and data_offsets", tensor=name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            self._fail(f"unsupported dtype {dtype!r}", tensor=name)
        if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in shape)):
            self._fail(f"shape must be a list of non-negative integers, got {shape!r}", tensor=name)
        if (not isinstance(offsets, list) or len(offsets) != 2 or
                not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            self._fail(f"data_offsets must be [begin, end], got {offsets!r}", tensor=name)
        begin, end = offsets
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end <= data_len:
            self._fail(f"truncated: data_offsets [{begin}, {end}] outside the {data_len}-byte data section",
                       tensor=name)
        if end - begin != nbytes:
            self._fail(f"data_offsets [{begin}, {end}] hold {end - begin} bytes, but {dtype} {tuple(shape)} "
                       f"needs {nbytes}", tensor=name)
        return TensorInfo(name, dtype, tuple(shape), self.data_offset + begin, nbytes)

    # ---- access --------------------------------------------------------------------------------------

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the map (BF16 as uint16 bits), in its own shape. An unaligned
        tensor (possible: the format does not align data) is copied."""
        info = self.tensors.get(name)
        if info is None:
            self._fail("tensor not in file", tensor=name)
        dt = DTYPES[info.dtype]
        if info.nbytes == 0:
            return np.zeros(info.shape, dt)
        raw = self._data[info.offset:info.offset + info.nbytes]
        if info.offset % dt.itemsize:
            raw = np.array(raw)
        return raw.view(dt).reshape(info.shape)

    def release(self, name: str) -> None:
        """Drop the resident pages of a tensor copied out of the map (see ``GGUFFile.release``)."""
        info = self.tensors.get(name)
        if info is not None and self._data is not None:
            release_mapped_range(self._data, info.offset, info.nbytes)

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, tensors={len(self.tensors)})"


def float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """A float tensor's values as float32: F32 as is (a view), F16 converted, BF16 bits shifted into the top half
    of a float32 (exact)."""
    if dtype == "F32":
        return a
    if dtype == "F16":
        return a.astype(np.float32)
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"float32: {dtype} is not a float dtype ({', '.join(FLOAT_DTYPES)})")
