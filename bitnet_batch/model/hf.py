"""Hugging Face BitNet checkpoints: ``config.json`` + ``*.safetensors`` (sharded too) + ``tokenizer.json``.

Two weight formats, told apart per projection by the stored dtype:

- **packed** (``microsoft/bitnet-b1.58-2B-4T``; ``quantization_config.quant_method = "bitnet"``): each projection
  is ``weight`` uint8 [out/4, in] plus ``weight_scale`` [1]. Four ternary rows share a packed row, across the
  output dimension (transformers ``pack_weights``): packed row r holds original rows r, r + R, r + 2R, r + 3R
  (R = out / 4) in bits 0-1, 2-3, 4-5, 6-7, code c meaning weight c - 1 (code 3 is invalid). The scale depends
  on ``quantization_config.linear_class``: ``"bitlinear"`` (the default) computes ``y / (s_x * weight_scale)``,
  so the stored value is 1 / alpha; ``"autobitlinear"`` computes ``y * weight_scale``, so it is alpha.
- **master weights** (``microsoft/bitnet-b1.58-2B-4T-bf16``, fine-tunes): float ``weight`` [out, in] in
  BF16 / F16 / F32, ternarized here exactly as transformers' online ``WeightQuant`` does in float32:
  ``s = 1 / max(mean|W|, 1e-5)``, ``t = clamp(rint(W * s), -1, 1)``, effective weight ``t / s``.

Everything else (norms, embedding, optional untied ``lm_head``) is float. Tensors are read through memory maps
(``safetensors.py``): a ternary projection is decoded into the kernel layout and its pages are dropped, the
embedding stays mapped in its stored type (BF16 bits, F16, F32), as for a GGUF.

``HFSource`` serves the tensors under their GGUF names (``hf_name`` maps them), so ``weights.load_weights`` and
``convert.py`` need nothing else. The model config comes from ``config.json`` with transformers' ``BitNetConfig``
defaults for absent keys. Errors are ``ModelFormatError`` naming the file (config.json, the index or the shard)
and the tensor as the checkpoint names it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jit_kernels import embedding as emb_k

from ..config import ModelConfig, normalize_activation
from ..errors import ConfigError, ModelFormatError
from .safetensors import FLOAT_DTYPES, SafetensorsFile, float32
from .weights import TensorSource

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
ARCH = "bitnet-b1.58"                       # our ModelConfig.arch for HF checkpoints: bitnet.cpp's semantics
PACK = 4                                    # ternary values per packed byte (transformers VALUES_PER_ITEM)
MIN_MEAN = np.float32(1e-5)                 # WeightQuant's clamp of mean|W|

#: transformers ``BitNetConfig`` defaults, used for keys a config.json leaves out.
DEFAULTS = {"vocab_size": 128256, "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 30,
            "num_attention_heads": 20, "num_key_value_heads": 5, "hidden_act": "relu2",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "attention_bias": False, "rope_theta": 500000.0}

_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "attn_sub_norm": "self_attn.attn_sub_norm", "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
                "ffn_sub_norm": "mlp.ffn_sub_norm"}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")      # buffers some older checkpoints saved


def hf_name(gguf_name: str) -> str:
    """The checkpoint name of a GGUF tensor name: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise KeyError(gguf_name)
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"


def is_checkpoint_dir(path: Path) -> bool:
    """A directory with a config.json: what ``load_model`` treats as a Hugging Face checkpoint."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


@dataclass(frozen=True)
class Quantization:
    """What ``quantization_config`` says about packed weights."""
    method: str | None          # "bitnet", or None when the config has no quantization_config
    linear_class: str           # "bitlinear" (weight_scale = 1 / alpha) | "autobitlinear" (weight_scale = alpha)
    mode: str                   # "offline" | "online" (informational: the format is told per tensor by dtype)

    @property
    def reciprocal_scale(self) -> bool:
        return self.linear_class == "bitlinear"


class Checkpoint:
    """A Hugging Face BitNet checkpoint directory: its config and the tensors of all its safetensors shards.

    Attributes: ``path`` (the directory), ``config`` (config.json as a dict), ``quant`` (Quantization),
    ``shards`` (SafetensorsFile per file), ``files`` (every file that defines the model: config, index, shards,
    tokenizer files, sorted; what ``sha256`` hashes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / CONFIG_FILE
        self.config = self._read_config()
        self.quant = self._read_quantization()
        self._where: dict[str, SafetensorsFile] = {}     # tensor name -> shard
        self._listed: dict[str, Path] = {}               # tensor name -> shard the index names (sharded only)
        self.index_path = self.path / INDEX_FILE if (self.path / INDEX_FILE).is_file() else None
        self.shards = [SafetensorsFile(p) for p in self._shard_paths()]
        for shard in self.shards:
            for name in shard.tensors:
                if name in self._where:
                    raise ModelFormatError(shard.path, f"tensor also in {self._where[name].path.name}", tensor=name)
                self._where[name] = shard
        self.files = sorted({self.config_path, *(s.path for s in self.shards),
                             *([self.index_path] if self.index_path else []),
                             *(self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file())})

    # ---- files -----------------------------------------------------------------------------------------

    def _read_json(self, path: Path) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelFormatError(path, "missing (a Hugging Face checkpoint needs it)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(path, f"not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ModelFormatError(path, "must hold a JSON object")
        return data

    def _read_config(self) -> dict:
        cfg = self._read_json(self.config_path)
        model_type = cfg.get("model_type")
        if model_type != "bitnet":
            raise ModelFormatError(self.config_path, f"model_type {model_type!r} is not supported; only BitNet "
                                   "checkpoints (model_type 'bitnet', BitNetForCausalLM) can be loaded")
        return cfg

    def _read_quantization(self) -> Quantization:
        qc = self.config.get("quantization_config")
        if qc is None:
            return Quantization(None, "bitlinear", "online")
        where = self.config_path
        if not isinstance(qc, dict):
            raise ModelFormatError(where, f"quantization_config must be an object, got {qc!r}")
        method = qc.get("quant_method")
        if method != "bitnet":
            raise ModelFormatError(where, f"quantization_config.quant_method {method!r} is not supported (only "
                                   "'bitnet': packed ternary weights, or none for master weights)")
        linear_class = qc.get("linear_class", "bitlinear")
        if linear_class not in ("bitlinear", "autobitlinear"):
            raise ModelFormatError(where, f"quantization_config.linear_class must be bitlinear or autobitlinear, "
                                   f"got {linear_class!r}")
        if qc.get("use_rms_norm"):
            raise ModelFormatError(where, "quantization_config.use_rms_norm (an extra RMSNorm inside every "
                                   "BitLinear) is not supported")
        skipped = [m for m in (qc.get("modules_to_not_convert") or []) if "lm_head" not in str(m)]
        if skipped:
            raise ModelFormatError(where, f"quantization_config.modules_to_not_convert {skipped!r}: projections "
                                   "kept in full precision are not supported")
        mode = qc.get("quantization_mode", "offline")
        if mode not in ("offline", "online"):
            raise ModelFormatError(where, f"quantization_config.quantization_mode must be offline or online, "
                                   f"got {mode!r}")
        return Quantization(method, linear_class, mode)

    def _shard_paths(self) -> list[Path]:
        if self.index_path is not None:
            index = self._read_json(self.index_path)
            wmap = index.get("weight_map")
            if not isinstance(wmap, dict) or not wmap:
                raise ModelFormatError(self.index_path, "weight_map must be a non-empty object")
            for name, fname in wmap.items():
                p = self.path / str(fname)
                if not p.is_file():
                    raise ModelFormatError(self.index_path, f"names shard {fname!r}, which is not in {self.path}",
                                           tensor=name)
                self._listed[name] = p
            return sorted(set(self._listed.values()))
        paths = sorted(self.path.glob("*.safetensors"))
        if not paths:
            raise ModelFormatError(self.path, f"no *.safetensors files (and no {INDEX_FILE})")
        return paths

    # ---- tensors ---------------------------------------------------------------------------------------

    def where(self, name: str) -> Path:
        """The file to name in an error about tensor ``name``: its shard, the shard the index names, the index,
        or the only shard."""
        if name in self._where:
            return self._where[name].path
        if name in self._listed:
            return self._listed[name]
        if self.index_path is not None:
            return self.index_path
        return self.shards[0].path if len(self.shards) == 1 else self.path

    def has(self, name: str) -> bool:
        return name in self._where

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor that has been copied out (see ``GGUFFile.release``)."""
        if name in self._where:
            self._where[name].release(name)

    def info(self, name: str):
        """(shard, TensorInfo); a ModelFormatError naming the file when the tensor is missing."""
        shard = self._where.get(name)
        if shard is None:
            raise ModelFormatError(self.where(name), "required tensor is missing", tensor=name)
        return shard, shard.tensors[name]

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def weight_format(self) -> str:
        """"packed" or "master" (by layer 0's q_proj), for inspect and provenance."""
        shard, info = self.info("model.layers.0.self_attn.q_proj.weight")
        return "packed" if info.dtype == "U8" else "master"

    def describe_format(self) -> str:
        """One line: the weight format and how it becomes ternary."""
        if self.weight_format() == "packed":
            rule = "weight_scale = 1/alpha" if self.quant.reciprocal_scale else "weight_scale = alpha"
            return f"packed 2-bit ternary (linear_class {self.quant.linear_class}: {rule})"
        _, info = self.info("model.layers.0.self_attn.q_proj.weight")
        return f"{info.dtype} master weights, ternarized at load (absmean, per tensor)"

    def revision(self) -> str | None:
        """The commit of a Hugging Face cache snapshot (``.../snapshots/<commit>``), else None."""
        if self.path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", self.path.name):
            return self.path.name
        return None

    def repo_id(self) -> str | None:
        """``owner/name`` of a Hugging Face cache snapshot (``models--owner--name/snapshots/<commit>``), else None."""
        if self.revision() is None:
            return None
        repo_dir = self.path.parent.parent.name
        return repo_dir[len("models--"):].replace("--", "/", 1) if repo_dir.startswith("models--") else None


# ---- config -----------------------------------------------------------------------------------------------

def _value(cfg: dict, key: str, kind, path: Path):
    """cfg[key] checked to be of ``kind`` (int: positive), the BitNetConfig default when absent."""
    value = cfg.get(key, DEFAULTS.get(key))
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, int) and not isinstance(value, bool) and value > 0)
    if not ok:
        want = {bool: "true or false", float: "a number", int: "a positive integer"}[kind]
        raise ModelFormatError(path, f"{key} must be {want}, got {value!r}")
    return kind(value)


def _rope_theta(cfg: dict, path: Path) -> float:
    """rope_theta from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (older); only
    plain RoPE (type "default", or "linear" with factor 1) is supported."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ModelFormatError(path, "rope_parameters / rope_scaling must be objects")
    for key, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        rope_type = d.get("rope_type", d.get("type", "default"))
        if not (rope_type == "default" or (rope_type == "linear" and float(d.get("factor", 1.0)) == 1.0)):
            raise ModelFormatError(path, f"RoPE scaling {key} = {d!r} is not supported (only plain RoPE)")
    theta = params.get("rope_theta", cfg.get("rope_theta", DEFAULTS["rope_theta"]))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ModelFormatError(path, f"rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def model_config(ckpt: Checkpoint, ffn_act: str | None = None) -> ModelConfig:
    """config.json -> ModelConfig (arch ``bitnet-b1.58``), validated against the embedding tensor."""
    cfg, path = ckpt.config, ckpt.config_path
    d, n_head = _value(cfg, "hidden_size", int, path), _value(cfg, "num_attention_heads", int, path)
    # BitNetConfig: an absent num_key_value_heads is 5, an explicit null means as many as the query heads
    n_head_kv = n_head if cfg.get("num_key_value_heads", 0) is None else _value(cfg, "num_key_value_heads", int, path)
    if d % n_head or n_head % n_head_kv or (d // n_head) % 2:
        raise ModelFormatError(path, f"bad head layout: hidden_size {d}, num_attention_heads {n_head}, "
                               f"num_key_value_heads {n_head_kv}")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != d // n_head:
        raise ModelFormatError(path, f"head_dim {head_dim} != hidden_size / num_attention_heads = {d // n_head} "
                               "is not supported")
    if _value(cfg, "attention_bias", bool, path):
        raise ModelFormatError(path, "attention_bias = true is not supported (BitNet has no biases)")
    try:
        act = normalize_activation(ffn_act if ffn_act is not None else cfg.get("hidden_act", DEFAULTS["hidden_act"]),
                                   "ffn activation override" if ffn_act is not None else "hidden_act")
    except ConfigError as e:
        if ffn_act is not None:
            raise
        raise ModelFormatError(path, str(e)) from None
    n_vocab = _value(cfg, "vocab_size", int, path)
    emb_name = _GLOBAL_NAMES["token_embd.weight"]
    shard, info = ckpt.info(emb_name)
    if info.shape != (n_vocab, d):
        raise ModelFormatError(shard.path, f"shape {list(info.shape)} but config.json needs [{n_vocab}, {d}] "
                               "(vocab_size, hidden_size)", tensor=emb_name)
    name = cfg.get("_name_or_path") or ckpt.repo_id() or ckpt.path.name
    return ModelConfig(arch=ARCH, name=str(name), n_vocab=n_vocab,
                       n_ctx=_value(cfg, "max_position_embeddings", int, path), n_embd=d,
                       n_layer=_value(cfg, "num_hidden_layers", int, path), n_head=n_head, n_head_kv=n_head_kv,
                       head_dim=d // n_head, n_ff=_value(cfg, "intermediate_size", int, path), n_rot=d // n_head,
                       rope_base=_rope_theta(cfg, path), rms_eps=_value(cfg, "rms_norm_eps", float, path),
                       ffn_act=act, tied_lm_head=_value(cfg, "tie_word_embeddings", bool, path))


# ---- weights ------------------------------------------------------------------------------------------------

def unpack_rows(packed: np.ndarray) -> np.ndarray:
    """transformers' packed uint8 [R, K] -> int8 ternary [4R, K]: row i*R + r is bits 2i..2i+1 of packed row r."""
    r = packed.shape[0]
    t = np.empty((PACK * r, packed.shape[1]), np.int8)
    for i in range(PACK):
        np.bitwise_and(packed >> (2 * i), 3, out=t[i * r:(i + 1) * r], casting="unsafe")
    t -= 1
    return t


def i2_rows(packed: np.ndarray) -> np.ndarray:
    """transformers' packed uint8 [R, K] (K a multiple of 128) -> the I2-block rows of the unpacked [4R, K] matrix
    (uint8 [4R, K/4], bitnet.cpp's I2_S row payload, what ``layout.from_i2s_rows`` takes), without the int8
    matrix: both formats store code = weight + 1 in 2 bits, only the bit positions differ."""
    r, k = packed.shape
    p = packed.reshape(r, k // 128, 4, 32)               # [row, block, group j (input 32j + m), byte m]
    out = np.empty((PACK * r, k // 128, 32), np.uint8)
    for i in range(PACK):                                # unpacked rows i*R .. i*R + R - 1: bits 2i, 2i + 1
        c = (p >> (2 * i)) & 3
        out[i * r:(i + 1) * r] = (c[:, :, 0] << 6) | (c[:, :, 1] << 4) | (c[:, :, 2] << 2) | c[:, :, 3]
    return out.reshape(PACK * r, k // 4)


def pack_rows_hf(t: np.ndarray) -> np.ndarray:
    """Inverse of ``unpack_rows`` (int8 ternary [4R, K] -> uint8 [R, K]); writes test checkpoints."""
    n = t.shape[0]
    if n % PACK:
        raise ValueError(f"pack_rows_hf: {n} rows is not a multiple of {PACK}")
    c = (t.astype(np.int16) + 1).astype(np.uint8).reshape(PACK, n // PACK, -1)
    return (c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6)).astype(np.uint8)


def absmean_ternarize(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Master weights (float32 [out, in]) -> (int8 ternary, alpha) as transformers' ``WeightQuant`` in float32:
    ``s = 1 / max(mean|W|, 1e-5)``, ``t = clamp(round(W * s), -1, 1)``, effective weight ``t / s`` (alpha = 1/s).
    Unlike ``weights.ternarize`` there is no exact path for already-ternary values: transformers has none either
    (a {-a, 0, a} tensor gets alpha = mean|W|, not a)."""
    mean = max(np.float32(np.abs(w).mean(dtype=np.float64)), MIN_MEAN)
    s = np.float32(1.0) / mean
    t = np.empty(w.shape, np.int8)
    np.clip(np.rint(w * s), -1, 1, out=t, casting="unsafe")
    return t, np.float32(np.float32(1.0) / s)


class HFSource(TensorSource):
    """The tensors of a ``Checkpoint`` under their GGUF names, for ``weights.load_weights`` and ``convert``."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.path = ckpt.path
        self._check_names()

    def _check_names(self) -> None:
        """Refuse tensors we would silently ignore (biases, extra norms, ...)."""
        expected = set(_GLOBAL_NAMES.values())
        n_layer = _value(self.ckpt.config, "num_hidden_layers", int, self.ckpt.config_path)
        for i in range(n_layer):
            for part in _LAYER_NAMES.values():
                expected |= {f"model.layers.{i}.{part}.weight", f"model.layers.{i}.{part}.weight_scale"}
        for name in self.ckpt.tensor_names():
            if name not in expected and not _IGNORED.search(name):
                raise ModelFormatError(self.ckpt.where(name), "unexpected tensor: not part of a BitNet model "
                                       f"with {n_layer} layers (biases and extra modules are not supported)",
                                       tensor=name)

    def _float(self, hname: str, shape: tuple[int, ...]):
        shard, info = self.ckpt.info(hname)
        if info.dtype not in FLOAT_DTYPES:
            raise ModelFormatError(shard.path, f"dtype {info.dtype}, want one of {', '.join(FLOAT_DTYPES)}",
                                   tensor=hname)
        if info.shape != shape:
            raise ModelFormatError(shard.path, f"shape {list(info.shape)} but the model needs {list(shape)}",
                                   tensor=hname)
        return shard, info

    def vector(self, name, n):
        hname = hf_name(name)
        shard, info = self._float(hname, (n,))
        return np.ascontiguousarray(float32(shard.array(hname), info.dtype), dtype=np.float32)

    def matrix(self, name, v, d):
        hname = hf_name(name)
        shard, info = self._float(hname, (v, d))
        a = shard.array(hname)
        kind = {"F32": emb_k.F32, "F16": emb_k.F16, "BF16": emb_k.BF16}[info.dtype]
        return (a if info.dtype == "F32" else a.view(np.uint16)), kind

    def ternary(self, name, n_in, n_out):
        hname = hf_name(name)
        shard, info = self.ckpt.info(hname)
        scale_name = hname + "_scale"
        if info.dtype == "U8":
            packed = self._packed(shard, info, hname, n_in, n_out)
            alpha = np.full(n_out, self._alpha(scale_name), np.float32)
            if n_in % 128 == 0:                          # straight into I2 rows (no int8 matrix)
                return None, alpha, i2_rows(packed)
            return unpack_rows(packed), alpha, None
        if info.dtype in FLOAT_DTYPES:
            if self.ckpt.has(scale_name):
                raise ModelFormatError(self.ckpt.where(scale_name), f"{info.dtype} weights with a weight_scale "
                                       "(unpacked offline format) are not supported: pack them, or give master "
                                       "weights without weight_scale", tensor=scale_name)
            if info.shape != (n_out, n_in):
                raise ModelFormatError(shard.path, f"shape {list(info.shape)} but the model needs [{n_out}, {n_in}]",
                                       tensor=hname)
            t, alpha = absmean_ternarize(float32(shard.array(hname), info.dtype))
        else:
            raise ModelFormatError(shard.path, f"dtype {info.dtype} for a projection (want U8 packed ternary or "
                                   f"{'/'.join(FLOAT_DTYPES)} master weights)", tensor=hname)
        return t, np.full(n_out, alpha, np.float32), None

    def _packed(self, shard, info, hname, n_in, n_out) -> np.ndarray:
        """The checked packed uint8 [n_out/4, n_in] (a view of the map)."""
        if self.ckpt.quant.method != "bitnet":
            raise ModelFormatError(shard.path, "packed uint8 weights, but config.json has no quantization_config "
                                   "with quant_method 'bitnet'", tensor=hname)
        if n_out % PACK or info.shape != (n_out // PACK, n_in):
            raise ModelFormatError(shard.path, f"shape {list(info.shape)} but packed weights of a [{n_out}, {n_in}] "
                                   f"projection need [{n_out / PACK:g}, {n_in}]", tensor=hname)
        packed = shard.array(hname)
        if np.any(packed & (packed >> 1) & 0x55):           # both bits of a field set: code 3
            raise ModelFormatError(shard.path, "packed weights hold code 3, which is not a ternary value",
                                   tensor=hname)
        return packed

    def _alpha(self, scale_name: str) -> np.float32:
        shard, info = self.ckpt.info(scale_name)
        if info.dtype not in FLOAT_DTYPES or int(np.prod(info.shape)) != 1:
            raise ModelFormatError(shard.path, f"weight_scale must be one float, got {info.dtype} "
                                   f"{list(info.shape)}", tensor=scale_name)
        ws = np.float32(float32(shard.array(scale_name), info.dtype).reshape(-1)[0])
        if not np.isfinite(ws) or ws <= 0:
            raise ModelFormatError(shard.path, f"weight_scale is {ws}, must be a positive number", tensor=scale_name)
        alpha = np.float32(np.float32(1.0) / ws) if self.ckpt.quant.reciprocal_scale else ws
        if not np.isfinite(alpha):
            raise ModelFormatError(shard.path, f"weight_scale {ws} gives an infinite scale", tensor=scale_name)
        return alpha

    def release(self, name):
        self.ckpt.release(hf_name(name))
