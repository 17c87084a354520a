"""Load a BitNet GGUF into the kernels' layout, once.

Ternary projections of a layer are fused by shared input: ``qkv`` = rows of q, k, v (one activation
quantization, one parallel matmul) and ``gate_up`` = rows of gate, up. Every projection is a
``Projection``: I2-block packed codes (see ``jit_kernels.ternary``) plus one float32 scale per output row
(each source tensor's per-tensor scale repeated over its rows).

Sources and how they become ternary codes + scale:
- I2_S (36): codes and the per-tensor fp32 scale from the tensor tail; when the input width is a multiple of
  128 the payload's rows are the kernel's rows already and are copied into their row pairs (no decode).
- TQ2_0 (35) / TQ1_0 (34): decoded; the fp16 block scales must be constant along each row (they are for a
  b1.58 checkpoint, where every block holds the tensor's absmean); the row's scale is used.
- F32 / F16 / BF16: if the values are already ternary (one magnitude per tensor, times an optional
  ``<name>.scale`` tensor as mainline "bitnet" GGUFs have), taken exactly; otherwise (master weights)
  ternarized with the b1.58 absmean rule alpha = max(mean|W|, 1e-5), t = clamp(rint(W / alpha), -1, 1).

The token embedding (and a separate ``output.weight``) stay memory-mapped in their file type: F16/BF16 are
viewed as uint16 bits and widened in the kernels, F32 is used as is.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from jit_kernels import embedding as emb_k
from jit_kernels.buffers import aligned_empty
from jit_kernels.ternary import BLOCK

from ..config import ModelConfig
from ..errors import ModelFormatError
from .gguf import GGMLType, GGUFFile
from . import quants
from .layout import from_i2s_rows, interleave_rows, pack_rows, padded, padded_rows, part_starts

LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_sub_norm", "attn_output",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_sub_norm", "ffn_down")
TERNARY_TYPES = (GGMLType.I2_S, GGMLType.TQ1_0, GGMLType.TQ2_0)
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


@dataclass
class Projection:
    """A ternary matrix in kernel layout, of one or more parts (fused projections): part i is rows
    [starts[i], starts[i] + sizes[i]) of ``packed`` and ``scale``; every part starts a row group, so an odd-sized
    part is followed by a padding row (scale 0) before the next one."""
    packed: np.ndarray   # uint8 [N, Kp // 4], I2 blocks in row pairs, Kp = n_in rounded up to 128, N even
    scale: np.ndarray    # float32 [N], weight scale per output row (0 for padding rows)
    n_in: int            # K (unpadded input width)
    starts: tuple[int, ...]   # first row of each part (even)
    sizes: tuple[int, ...]    # rows of each part

    @property
    def n_out(self) -> int:
        return self.scale.shape[0]

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes


@dataclass
class LayerWeights:
    attn_norm: np.ndarray      # float32 [D]
    qkv: Projection            # [q_dim + 2 * kv_dim] x D
    attn_sub_norm: np.ndarray  # float32 [q_dim]
    wo: Projection             # D x q_dim
    ffn_norm: np.ndarray       # float32 [D]
    gate_up: Projection        # [2F] x D
    ffn_sub_norm: np.ndarray   # float32 [F]
    down: Projection           # D x F

    @functools.cached_property
    def kernel_args(self) -> tuple:
        """The layer's weights in ``jit_kernels.layer.bitnet_layer``'s argument order (fused parts' first rows
        and sizes as int64 arrays), built once."""
        parts = lambda p: (np.array(p.starts, np.int64), np.array(p.sizes, np.int64))  # noqa: E731
        return (self.attn_norm, self.qkv.packed, self.qkv.scale, *parts(self.qkv), self.attn_sub_norm,
                self.wo.packed, self.wo.scale, self.ffn_norm, self.gate_up.packed, self.gate_up.scale,
                *parts(self.gate_up), self.ffn_sub_norm, self.down.packed, self.down.scale)


@dataclass
class Weights:
    tok_embd: np.ndarray       # [V, D] uint16 (F16/BF16 bits) or float32, memory-mapped
    tok_kind: int              # jit_kernels.embedding.F16 / BF16 / F32
    output: np.ndarray         # lm_head matrix [V, D]: tok_embd when tied
    output_kind: int
    output_norm: np.ndarray    # float32 [D]
    layers: list[LayerWeights]

    @property
    def nbytes_ternary(self) -> int:
        return sum(p.nbytes for lw in self.layers for p in (lw.qkv, lw.wo, lw.gate_up, lw.down))


class TensorSource:
    """Where ``load_weights`` reads a model's tensors from, by their GGUF names (``token_embd.weight``,
    ``blk.N.attn_q.weight``, ...). Subclasses: ``GGUFSource`` here, ``hf.HFSource`` for Hugging Face checkpoints.
    Errors are ``ModelFormatError`` naming the file and the tensor as the source stores it."""

    path = None

    def vector(self, name: str, n: int) -> np.ndarray:
        """A norm weight as float32 [n]."""
        raise NotImplementedError

    def ternary(self, name: str, n_in: int, n_out: int):
        """-> (int8 ternary [n_out, n_in] or None, float32 scale [n_out], I2_S payload rows [n_out, n_in/4] or
        None): one of the ternary matrix and the payload is given."""
        raise NotImplementedError

    def matrix(self, name: str, v: int, d: int):
        """A float [V, D] matrix (embedding, lm_head) kept in its stored type: (array, embedding kind)."""
        raise NotImplementedError

    def release(self, name: str) -> None:
        """The tensor has been copied out: its mapped pages may be dropped."""

    def fused(self, names_out, n_in):
        """Fuse projections sharing an input into one Projection (rows concatenated in order, each part starting
        a row group: a part of odd size gets a padding row)."""
        sizes = tuple(n_out for _, n_out in names_out)
        starts, n_rows = part_starts(sizes)
        packed = aligned_empty((n_rows, padded(n_in) // 4), np.uint8)     # cache-line aligned: see buffers
        scale = np.zeros(n_rows, np.float32)
        for (name, n_out), lo in zip(names_out, starts):      # each part's row pairs, in place
            t, scale[lo:lo + n_out], payload = self.ternary(name, n_in, n_out)
            dst = packed[lo:lo + padded_rows(n_out)]
            if payload is not None:
                from_i2s_rows(payload, out=dst)
            else:
                interleave_rows(pack_rows(t), out=dst)
            self.release(name)          # copied out of the memory map: stop counting those pages
        return Projection(packed=packed, scale=scale, n_in=n_in, starts=starts, sizes=sizes)


class GGUFSource(TensorSource):
    """The tensors of a GGUF file."""

    def __init__(self, gf: GGUFFile):
        self.gf = gf
        self.path = gf.path

    def info(self, name):
        if name not in self.gf.tensors:
            raise ModelFormatError(self.path, "required tensor is missing", tensor=name)
        return self.gf.tensors[name]

    def vector(self, name, n):
        info = self.info(name)
        if info.ggml_type not in FLOAT_TYPES:
            raise ModelFormatError(self.path, f"norm weights must be F32/F16/BF16, got type {_tname(info.ggml_type)}",
                                   tensor=name)
        if tuple(info.shape) != (n,):
            raise ModelFormatError(self.path, f"shape {tuple(info.shape)} but the model needs ({n},)", tensor=name)
        return np.ascontiguousarray(quants.float_tensor(self.gf.raw(name), info.ggml_type, info.shape),
                                    dtype=np.float32).reshape(n)

    def ternary(self, name, n_in, n_out):
        """A separate ``<name>.scale`` tensor (mainline "bitnet" GGUFs) multiplies the scale of any type."""
        t, rows, payload = self._ternary(name, n_in, n_out)
        return t, (rows * self._scale_tensor(name)).astype(np.float32), payload

    def release(self, name):
        self.gf.release(name)

    def _ternary(self, name, n_in, n_out):
        info = self.info(name)
        if tuple(info.shape) != (n_in, n_out):
            raise ModelFormatError(self.path, f"shape {tuple(info.shape)} but the model needs ({n_in}, {n_out})",
                                   tensor=name)
        typ, raw = info.ggml_type, self.gf.raw(name)
        if typ == GGMLType.I2_S:
            scale = _i2s_scale(raw, n_in * n_out, self.path, name)
            rows = np.full(n_out, scale, np.float32)
            if n_in % BLOCK == 0:
                return None, rows, raw[: n_in * n_out // 4].reshape(n_out, n_in // 4)     # I2 rows as they are
            t, _ = quants.unpack_i2s(raw, n_in, n_out)
            return t, rows, None
        if typ in (GGMLType.TQ1_0, GGMLType.TQ2_0):
            unpack = quants.unpack_tq2_0 if typ == GGMLType.TQ2_0 else quants.unpack_tq1_0
            t, d = unpack(raw, n_in, n_out)
            if not np.all(d == d[:, :1]):
                raise ModelFormatError(self.path, "block scales vary within a row; only ternary checkpoints with "
                                       "one scale per tensor (or per row) are supported", tensor=name)
            return t, np.ascontiguousarray(d[:, 0], dtype=np.float32), None
        if typ in FLOAT_TYPES:
            t, scale = ternarize(quants.float_tensor(raw, typ, info.shape).reshape(n_out, n_in))
            return t, np.full(n_out, scale, np.float32), None
        raise ModelFormatError(self.path, f"unsupported tensor type {_tname(typ)} for a ternary projection "
                               "(supported: I2_S, TQ1_0, TQ2_0, F32, F16, BF16)", tensor=name)

    def _scale_tensor(self, name):
        sname = name[: -len(".weight")] + ".scale" if name.endswith(".weight") else name + ".scale"
        if sname not in self.gf.tensors:
            return np.float32(1.0)
        info = self.gf.tensors[sname]
        val = quants.float_tensor(self.gf.raw(sname), info.ggml_type, info.shape).reshape(-1)
        if val.size != 1:
            raise ModelFormatError(self.path, f"scale tensor must hold one value, has {val.size}", tensor=sname)
        return np.float32(val[0])

    def matrix(self, name, v, d):
        """A float [V, D] matrix kept in its file type for the embedding kernels."""
        info = self.info(name)
        if tuple(info.shape) != (d, v):
            raise ModelFormatError(self.path, f"shape {tuple(info.shape)} but the model needs ({d}, {v})", tensor=name)
        raw = self.gf.raw(name)
        if info.ggml_type == GGMLType.F16:
            return raw.view(np.uint16).reshape(v, d), emb_k.F16
        if info.ggml_type == GGMLType.BF16:
            return raw.view(np.uint16).reshape(v, d), emb_k.BF16
        if info.ggml_type == GGMLType.F32:
            return raw.view(np.float32).reshape(v, d), emb_k.F32
        raise ModelFormatError(self.path, f"unsupported type {_tname(info.ggml_type)} for an embedding matrix "
                               "(supported: F16, BF16, F32)", tensor=name)


def _tname(typ) -> str:
    try:
        return GGMLType(typ).name
    except ValueError:
        return f"id {int(typ)}"


def _i2s_scale(raw, ne, path, name) -> np.float32:
    scale = raw[ne // 4: ne // 4 + 4].view(np.float32)[0]
    if not np.isfinite(scale) or scale < 0:
        raise ModelFormatError(path, f"I2_S scale is {scale}", tensor=name)
    return np.float32(scale)


def ternarize(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Float weights -> (int8 ternary, per-tensor scale). Exact when w already holds {-s, 0, +s};
    otherwise the BitNet b1.58 absmean rule."""
    a = np.abs(w)
    nz = a[a > 0]
    if nz.size == 0:
        return np.zeros(w.shape, np.int8), np.float32(0.0)
    s_max, s_min = nz.max(), nz.min()
    if s_max - s_min <= 1e-6 * s_max:
        return np.sign(w).astype(np.int8), np.float32(s_max)
    alpha = np.float32(max(a.astype(np.float64).mean(), 1e-5))
    t = np.clip(np.rint(w / alpha), -1, 1).astype(np.int8)
    return t, alpha


def load_weights(source: GGUFFile | TensorSource, cfg: ModelConfig) -> Weights:
    """The model's weights in kernel layout, read from a GGUF file or any ``TensorSource`` (by GGUF names)."""
    ld = GGUFSource(source) if isinstance(source, GGUFFile) else source
    d, f, v = cfg.n_embd, cfg.n_ff, cfg.n_vocab
    tok, tok_kind = ld.matrix("token_embd.weight", v, d)
    if cfg.tied_lm_head:
        out, out_kind = tok, tok_kind
    else:
        out, out_kind = ld.matrix("output.weight", v, d)
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=ld.vector(p + "attn_norm.weight", d),
            qkv=ld.fused([(p + "attn_q.weight", cfg.q_dim), (p + "attn_k.weight", cfg.kv_dim),
                          (p + "attn_v.weight", cfg.kv_dim)], d),
            attn_sub_norm=ld.vector(p + "attn_sub_norm.weight", cfg.q_dim),
            wo=ld.fused([(p + "attn_output.weight", d)], cfg.q_dim),
            ffn_norm=ld.vector(p + "ffn_norm.weight", d),
            gate_up=ld.fused([(p + "ffn_gate.weight", f), (p + "ffn_up.weight", f)], d),
            ffn_sub_norm=ld.vector(p + "ffn_sub_norm.weight", f),
            down=ld.fused([(p + "ffn_down.weight", d)], f),
        ))
    return Weights(tok_embd=tok, tok_kind=tok_kind, output=out, output_kind=out_kind,
                   output_norm=ld.vector("output_norm.weight", d), layers=layers)
