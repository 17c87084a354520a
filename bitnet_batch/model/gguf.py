"""Our own GGUF reader: header, metadata, tensor infos, and a read-only memory map of the tensor data.

We do not use the pip ``gguf`` package because it cannot size tensors of type 36 (bitnet.cpp's I2_S,
whose id clashes with ids that upstream ggml retired). See ``docs/model.md`` section 3.

File layout (GGUF v2/v3, little-endian)::

    "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x   (key: string, value_type: u32, value)
    tensor_count x (name: string, n_dims: u32, ne[n_dims]: u64, ggml_type: u32, offset: u64)
    padding to general.alignment (default 32)
    tensor data; each tensor starts at data_start + offset, offset a multiple of the alignment

``string`` = u64 byte length + UTF-8 bytes; ``array`` = element type u32 + count u64 + elements.

Every problem is reported as ``ModelFormatError(path, problem, tensor=...)``: length fields are checked
against the bytes left in the file before anything is allocated, and tensor data is only memory-mapped.
"""
from __future__ import annotations

import enum
import mmap
import os
import pathlib
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelFormatError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                      # GGML_MAX_DIMS
KEY_ALIGNMENT = "general.alignment"
MAX_ARRAY_NESTING = 8             # arrays of arrays: guards the recursion against corrupt files


class GGMLType(enum.IntEnum):
    """ggml tensor type ids. 36..39 follow the bitnet.cpp fork (upstream retired or reused those ids)."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    I2_S = 36     # bitnet.cpp: 2-bit ternary, one fp32 scale per tensor
    I8_S = 37     # bitnet.cpp activation type, never stored in files
    TL1 = 38      # bitnet.cpp ARM lookup-table layout
    TL2 = 39      # bitnet.cpp x86 lookup-table layout


class GGUFValueType(enum.IntEnum):
    """Metadata value type ids."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# value type -> little-endian numpy dtype of one scalar (STRING / ARRAY are variable-sized)
SCALAR_DTYPES: dict[int, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}

# value type -> struct format of one scalar (numpy's type chars do not match struct's sizes for 64-bit ints)
SCALAR_FORMATS: dict[int, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<B",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}

# ggml type -> (elements per block along ne0, bytes per block). I2_S is special-cased (see tensor_nbytes).
BLOCK_LAYOUT: dict[int, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 36), GGMLType.IQ4_NL: (32, 18),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176), GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66), GGMLType.IQ2_XS: (256, 74), GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50), GGMLType.IQ3_S: (256, 110), GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136), GGMLType.IQ1_M: (256, 56),
    GGMLType.TQ1_0: (256, 54), GGMLType.TQ2_0: (256, 66),
}
_VALUE_TYPE_IDS = frozenset(int(v) for v in GGUFValueType)
_GGML_TYPE_IDS = frozenset(int(t) for t in GGMLType)

I2S_BLOCK = 128          # I2_S packs the flat tensor in blocks of 128 values -> 32 bytes (x86 layout)
I2S_TAIL = 32            # fp32 scale + 28 padding bytes after the packed codes


def ggml_type_name(ggml_type: int) -> str:
    """'I2_S (36)' for known ids, 'id 99' otherwise."""
    try:
        return f"{GGMLType(ggml_type).name} ({int(ggml_type)})"
    except ValueError:
        return f"id {int(ggml_type)}"


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this type and ggml shape (ne0 first) occupies in a GGUF file.

    Raises ValueError for types we cannot size and for shapes that do not fill whole blocks.
    """
    ne = 1
    for n in shape:
        if int(n) <= 0:
            raise ValueError(f"shape {tuple(shape)} has a dimension <= 0")
        ne *= int(n)
    if ggml_type == GGMLType.I2_S:
        # Blocks run over the flattened tensor; the fp32 scale sits at byte ne/4 (i2s_format.md section 2).
        if ne % I2S_BLOCK:
            raise ValueError(f"I2_S needs a multiple of {I2S_BLOCK} elements, shape {tuple(shape)} has {ne}")
        return ne // 4 + I2S_TAIL
    if ggml_type not in BLOCK_LAYOUT:
        raise ValueError(f"tensor type {ggml_type_name(ggml_type)} is not supported")
    block, block_bytes = BLOCK_LAYOUT[ggml_type]
    if int(shape[0]) % block:
        raise ValueError(f"{GGMLType(ggml_type).name} needs ne0 to be a multiple of its block size {block}, "
                         f"shape {tuple(shape)}")
    return ne // block * block_bytes


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file."""
    name: str
    shape: tuple[int, ...]      # ggml order: shape[0] = ne0 = fastest axis = in_features; shape[1] = out_features
    ggml_type: int
    offset: int                 # absolute byte offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file. ``what`` names the section for errors."""

    def __init__(self, buf, path: pathlib.Path, size: int):
        self.buf, self.path, self.size = buf, path, size
        self.pos = 0
        self.what = "header"
        self.tensor: str | None = None

    def fail(self, problem: str):
        raise ModelFormatError(self.path, problem, tensor=self.tensor)

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int) -> int:
        """Reserve n bytes; return their start offset."""
        if n > self.left():
            self.fail(f"truncated {self.what}: need {n} bytes at offset {self.pos}, file has {self.size}")
        start = self.pos
        self.pos += n
        return start

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8))[0]

    def string(self) -> str:
        at = self.pos
        n = self.u64()
        if n > self.left():
            self.fail(f"{self.what}: string length {n} at offset {at} exceeds the {self.left()} bytes "
                      f"left in the file (truncated or corrupt)")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{self.what}: string at offset {at} is not valid UTF-8 ({e.reason} at byte {e.start})")

    def scalar(self, vtype: int):
        fmt = SCALAR_FORMATS[vtype]
        value = struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]
        return bool(value) if vtype == GGUFValueType.BOOL else value

    def value(self, vtype: int):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            return self.array()
        if vtype in SCALAR_DTYPES:
            return self.scalar(vtype)
        self.fail(f"{self.what}: unknown metadata value type {vtype}")

    def array(self, depth: int = 0):
        at = self.pos
        if depth > MAX_ARRAY_NESTING:
            self.fail(f"{self.what}: arrays nested deeper than {MAX_ARRAY_NESTING} levels at offset {at}")
        etype = self.u32()
        count = self.u64()
        if etype not in _VALUE_TYPE_IDS:
            self.fail(f"{self.what}: unknown array element type {etype}")
        min_size = SCALAR_DTYPES[etype].itemsize if etype in SCALAR_DTYPES else (8 if etype == GGUFValueType.STRING
                                                                                  else 12)
        if count * min_size > self.left():
            self.fail(f"{self.what}: array of {count} {GGUFValueType(etype).name} elements at offset {at} cannot "
                      f"fit in the {self.left()} bytes left in the file (truncated or corrupt)")
        if etype == GGUFValueType.STRING:
            return self._strings(count)
        if etype == GGUFValueType.ARRAY:
            return [self.array(depth + 1) for _ in range(count)]
        dt = SCALAR_DTYPES[etype]
        start = self.take(count * dt.itemsize)
        arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=start).copy()   # copy: the map is closed later
        return arr.astype(bool) if etype == GGUFValueType.BOOL else arr

    def _strings(self, count: int) -> list[str]:
        # Hot loop for 128k tokens / 280k merges: local names, one bounds check per string.
        buf, size, unpack = self.buf, self.size, struct.unpack_from
        pos, out = self.pos, []
        append = out.append
        try:
            for i in range(count):
                if pos + 8 > size:
                    self.pos = pos
                    self.fail(f"truncated {self.what}: string #{i} length at offset {pos}, file has {size}")
                (n,) = unpack("<Q", buf, pos)
                pos += 8
                if n > size - pos:
                    self.pos = pos
                    self.fail(f"{self.what}: string #{i} length {n} at offset {pos - 8} exceeds the "
                              f"{size - pos} bytes left in the file (truncated or corrupt)")
                append(buf[pos:pos + n].decode("utf-8"))
                pos += n
        except UnicodeDecodeError as e:
            self.fail(f"{self.what}: string #{len(out)} at offset {pos} is not valid UTF-8 ({e.reason})")
        self.pos = pos
        return out


def release_mapped_range(data: np.memmap | None, offset: int, nbytes: int) -> None:
    """Drop the resident pages of bytes [offset, offset + nbytes) of a read-only file memory map (whole pages
    inside the range only), first marking them as not for huge pages; see ``GGUFFile.release``. A no-op where
    madvise is unavailable or the map is closed."""
    mm = getattr(data, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start = -(-offset // page) * page
    end = (offset + nbytes) // page * page
    if end > start:
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            mm.madvise(mmap.MADV_NOHUGEPAGE, start, end - start)
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def release_array_pages(a: np.ndarray) -> None:
    """``release_mapped_range`` for the bytes of ``a``, a C-contiguous view of a read-only ``np.memmap`` (a GGUF's
    or a safetensors shard's): drop its resident pages once it has been copied out. A no-op for other arrays."""
    mm = getattr(a, "_mmap", None)
    if mm is None or not a.flags.c_contiguous:
        return
    start = np.frombuffer(mm, np.uint8).ctypes.data       # the address of the map's first byte
    release_mapped_range(a, a.ctypes.data - start, a.nbytes)


def mapped_file_range(a: np.ndarray) -> tuple[str, int] | None:
    """(file path, byte offset) of ``a``'s bytes when it is a C-contiguous view of a read-only ``np.memmap`` of a
    whole file (a GGUF's or a safetensors shard's, mapped from offset 0), else None."""
    mm, path = getattr(a, "_mmap", None), getattr(a, "filename", None)
    if mm is None or path is None or not a.flags.c_contiguous or getattr(a, "offset", 0):
        return None
    return path, a.ctypes.data - np.frombuffer(mm, np.uint8).ctypes.data


class GGUFFile:
    """A parsed GGUF file. Tensor data stays on disk: ``raw(name)`` is a view of a read-only memory map.

    Attributes: ``path``, ``version``, ``alignment``, ``metadata`` (key -> str / int / float / bool /
    list[str] / 1-D numpy array), ``value_types`` (key -> (GGUFValueType, element type or None)),
    ``tensors`` (name -> TensorInfo, in file order), ``data_offset`` (start of the data section),
    ``file_size``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._data: np.memmap | None = None
        self.file_size = self._stat_size()
        with open(self.path, "rb") as f:
            if self.file_size == 0:
                raise ModelFormatError(self.path, "truncated header: the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                self._parse(_Cursor(buf, self.path, self.file_size))
        if self.tensors:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")

    def _stat_size(self) -> int:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise ModelNotFoundError(f"{self.path}: no such file") from None
        except OSError as e:
            raise ModelFormatError(self.path, f"cannot open: {e.strerror}") from None
        if not self.path.is_file():
            raise ModelFormatError(self.path, "not a regular file")
        return st.st_size

    # ---- parsing -------------------------------------------------------------------------------------

    def _parse(self, cur: _Cursor) -> None:
        n_tensors, n_kv = self._parse_header(cur)
        self._parse_kvs(cur, n_kv)
        self.alignment = self._read_alignment()
        infos = self._parse_tensor_infos(cur, n_tensors)
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self._place_tensors(infos)

    def _parse_header(self, cur: _Cursor) -> tuple[int, int]:
        magic = bytes(cur.buf[:4])
        if len(magic) < 4 and GGUF_MAGIC.startswith(magic):
            cur.fail(f"truncated header: the file has only {self.file_size} bytes")
        if magic != GGUF_MAGIC:
            cur.fail(f"not a GGUF file: magic {magic!r}")
        cur.take(4)
        self.version = cur.u32()
        if self.version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            if swapped in (1, 2, 3):
                cur.fail(f"big-endian GGUF (version {swapped}) is not supported")
            cur.fail(f"unsupported GGUF version {self.version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        n_tensors, n_kv = cur.u64(), cur.u64()
        # Smallest possible entries: tensor info 8+4+8+4+8 bytes, KV 8+4+1 bytes.
        if n_tensors * 32 > cur.left():
            cur.fail(f"header claims {n_tensors} tensors, which cannot fit in the {self.file_size}-byte file "
                     "(truncated or corrupt)")
        if n_kv * 13 > cur.left():
            cur.fail(f"header claims {n_kv} metadata entries, which cannot fit in the {self.file_size}-byte file "
                     "(truncated or corrupt)")
        return n_tensors, n_kv

    def _parse_kvs(self, cur: _Cursor, n_kv: int) -> None:
        for i in range(n_kv):
            cur.what = f"metadata entry #{i} key"
            key = cur.string()
            cur.what = f"metadata entry #{i} ('{key}')"
            if key in self.metadata:
                cur.fail(f"duplicate metadata key '{key}'")
            vtype = cur.u32()
            if vtype not in _VALUE_TYPE_IDS:
                cur.fail(f"{cur.what}: unknown metadata value type {vtype}")
            at = cur.pos
            self.metadata[key] = cur.value(vtype)
            # For arrays also remember the element type (the writer copies tokenizer KVs type-exactly).
            etype = GGUFValueType(struct.unpack_from("<I", cur.buf, at)[0]) if vtype == GGUFValueType.ARRAY else None
            self.value_types[key] = (GGUFValueType(vtype), etype)

    def _read_alignment(self) -> int:
        align = self.metadata.get(KEY_ALIGNMENT, DEFAULT_ALIGNMENT)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ModelFormatError(self.path, f"'{KEY_ALIGNMENT}' must be a positive power of two, got {align!r}")
        return align

    def _parse_tensor_infos(self, cur: _Cursor, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
        infos, seen = [], set()
        for i in range(n_tensors):
            cur.what, cur.tensor = f"tensor info #{i} name", None
            name = cur.string()
            cur.what, cur.tensor = f"tensor info #{i}", name
            if name in seen:
                cur.fail("duplicate tensor name")
            seen.add(name)
            n_dims = cur.u32()
            if not 1 <= n_dims <= MAX_DIMS:
                cur.fail(f"n_dims is {n_dims}, must be 1..{MAX_DIMS}")
            shape = tuple(cur.u64() for _ in range(n_dims))
            ggml_type, offset = cur.u32(), cur.u64()
            infos.append((name, shape, ggml_type, offset))
        cur.what, cur.tensor = "data section", None
        return infos

    def _place_tensors(self, infos) -> None:
        for name, shape, ggml_type, offset in infos:
            def fail(problem, name=name):
                raise ModelFormatError(self.path, problem, tensor=name)
            if any(n == 0 for n in shape):
                fail(f"shape {shape} has a zero dimension")
            if ggml_type not in _GGML_TYPE_IDS:
                fail(f"unknown tensor type id {ggml_type}")
            try:
                nbytes = tensor_nbytes(ggml_type, shape)
            except ValueError as e:
                fail(str(e))
            if offset % self.alignment:
                fail(f"misaligned data offset {offset}: not a multiple of the alignment {self.alignment}")
            start = self.data_offset + offset
            if start + nbytes > self.file_size:
                fail(f"truncated: tensor needs {nbytes} bytes at offset {start}, file has {self.file_size}")
            self.tensors[name] = TensorInfo(name, shape, int(ggml_type), start, nbytes)
        self._check_overlaps()

    def _check_overlaps(self) -> None:
        ordered = sorted(self.tensors.values(), key=lambda t: t.offset)
        for prev, cur in zip(ordered, ordered[1:]):
            if cur.offset < prev.offset + prev.nbytes:
                raise ModelFormatError(self.path, f"data at offset {cur.offset} overlaps tensor '{prev.name}' "
                                       f"({prev.offset}..{prev.offset + prev.nbytes})", tensor=cur.name)

    # ---- access --------------------------------------------------------------------------------------

    def release(self, name: str) -> None:
        """Drop the resident pages of a tensor's bytes from this process's memory map once the tensor has been
        copied out, so the process is not charged twice for it (the pages stay in the OS page cache and fault
        back in if read again). The range is first marked as not for huge pages: where the page cache holds the
        file in large folios, the kernel otherwise maps them back in whole (~190 MB of the 2B4T file's released
        tensors counted in RSS again during the first steps, seen on a 6.18 kernel). A no-op where madvise is
        unavailable."""
        info = self.tensors.get(name)
        if info is not None:
            release_mapped_range(self._data, info.offset, info.nbytes)

    def raw(self, name: str) -> np.ndarray:
        """uint8 view (no copy) of exactly the tensor's ``nbytes`` bytes."""
        info = self.tensors.get(name)
        if info is None:
            raise ModelFormatError(self.path, "tensor not in file", tensor=name)
        if self._data is None:
            raise ValueError(f"{self.path}: GGUFFile is closed")
        return self._data[info.offset:info.offset + info.nbytes]

    def close(self) -> None:
        """Drop our reference to the memory map. Views from raw() stay valid; the OS mapping is released
        when the last of them is gone (unmapping under live views could crash the process)."""
        self._data = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, kvs={len(self.metadata)}, "
                f"tensors={len(self.tensors)})")
