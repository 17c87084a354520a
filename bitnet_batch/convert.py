"""`bitnet-batch convert`: a BitNet model (a Hugging Face checkpoint, or a GGUF) -> a GGUF for bitnet.cpp or llama.cpp.

Weight types (``--type``), each lossless for the ternary model our engine runs (``tests/test_convert.py``: the
converted file and its source give bit-identical logits):

- ``i2_s`` -> arch ``bitnet-b1.58`` for bitnet.cpp: projections in I2_S (x86 layout, the fp32 per-tensor scale
  in the tensor's tail; ``i2s_format.md``). bitnet.cpp's kernels read each row in 128-value blocks, so a
  projection whose input width is not a multiple of 128 is written as F32 ternary values times the scale instead.
- ``tq2_0`` / ``tq1_0`` -> arch ``bitnet`` for mainline llama.cpp: projections in TQ2_0 / TQ1_0 with block scale
  d = 1 and the per-tensor scale as an F32 ``<name>.scale`` [1] tensor, which llama.cpp's ``bitnet`` graph
  multiplies in (``wq_s`` ...). Putting the scale into the fp16 ``d`` instead would round it to fp16. Input
  widths that are not a multiple of 256 (the TQ block) are written as F16 ternary values with the same
  ``.scale`` tensor.
- ``f16`` -> arch ``bitnet``: F16 ternary values + ``.scale`` tensors (a base for ``llama-quantize``).

Everything else is common: norms in F32, ``token_embd`` (and an untied ``output``) in the source's own type
(BF16 / F16 / F32, so the lm_head is unchanged), the model hyper-parameters with ``{arch}.hidden_activation``
(the FFN activation: mainline llama.cpp's ``bitnet`` graph still hard-codes SiLU; bitnet.cpp's ``bitnet-b1.58``
uses relu^2), and the tokenizer (``tokenizer.ggml.*`` with ``pre = "llama-bpe"`` for the LLaMA-3 vocabulary,
which the official 2B4T GGUF lacks) and chat template. Provenance goes into ``general.source.url`` and
``bitnet_batch.convert.*`` keys, which ``inspect`` shows.

Tensors are produced one at a time while the file is written (a Hugging Face projection is unpacked or
ternarized once, when its turn comes; the embedding is copied in 64 MB row chunks whose mapped pages are then
dropped), so converting the 2B4T model needs little memory beyond one tensor and the tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jit_kernels import embedding as emb_k

from . import __version__
from .config import ModelConfig
from .errors import ConfigError, ModelFormatError
from .model import quants
from .model.gguf import GGMLType, GGUFFile, GGUFValueType
from .model.hf import Checkpoint, HFSource, model_config
from .model.hub import resolve_model_path
from .model.layout import from_i2s_rows, unpack_kernel
from .model.model import files_sha256
from .model.weights import GGUFSource, TensorSource

TYPES = ("i2_s", "tq2_0", "tq1_0", "f16")
ARCH = {"i2_s": "bitnet-b1.58", "tq2_0": "bitnet", "tq1_0": "bitnet", "f16": "bitnet"}
FILE_TYPE = {"i2_s": 40, "tq1_0": 36, "tq2_0": 37, "f16": 1}          # general.file_type (LLAMA_FTYPE_*)
BLOCK = {"i2_s": 128, "tq2_0": 256, "tq1_0": 256, "f16": 1}           # input widths the type stores
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LAYER_ORDER = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_sub_norm", "attn_output", "ffn_norm", "ffn_gate",
               "ffn_up", "ffn_sub_norm", "ffn_down")
_EMB_TYPES = {emb_k.F32: GGMLType.F32, emb_k.F16: GGMLType.F16, emb_k.BF16: GGMLType.BF16}
_PRE = {"llama3": "llama-bpe", "gpt2": "gpt-2"}                       # VocabSpec.pattern -> tokenizer.ggml.pre
KEY_PREFIX = "bitnet_batch.convert."


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert`` wrote."""
    path: Path
    weight_type: str
    arch: str
    tensors: int
    fallback: tuple[str, ...]        # projections written in F32 / F16 because their rows do not fill blocks
    nbytes: int
    warnings: tuple[str, ...] = ()   # what bitnet.cpp / llama.cpp will not do with the file


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(n_in, n_out) of each projection."""
    d, f = cfg.n_embd, cfg.n_ff
    return {"attn_q": (d, cfg.q_dim), "attn_k": (d, cfg.kv_dim), "attn_v": (d, cfg.kv_dim),
            "attn_output": (cfg.q_dim, d), "ffn_gate": (d, f), "ffn_up": (d, f), "ffn_down": (f, d)}


def _ternary(source: TensorSource, name: str, n_in: int, n_out: int) -> tuple[np.ndarray, np.float32]:
    """(int8 ternary [n_out, n_in], the per-tensor scale) of a projection, whatever the source stores."""
    t, rows, payload = source.ternary(name, n_in, n_out)
    if t is None:
        t = unpack_kernel(from_i2s_rows(np.ascontiguousarray(payload)), n_in, n_out)
    if rows.size and not np.all(rows == rows[0]):
        raise ModelFormatError(source.path, "the scale varies between rows; GGUF ternary types hold one scale per "
                               "tensor", tensor=name)
    return t, np.float32(rows[0] if rows.size else 0.0)


def model_metadata(cfg: ModelConfig, ckpt: Checkpoint | None = None, arch: str | None = None) -> dict:
    """The GGUF metadata of a model's hyper-parameters (``general.*`` and ``{arch}.*``), as ``convert`` writes it."""
    a = arch or cfg.arch
    md = {"general.architecture": a, "general.name": cfg.name,
          f"{a}.vocab_size": cfg.n_vocab, f"{a}.context_length": cfg.n_ctx, f"{a}.embedding_length": cfg.n_embd,
          f"{a}.block_count": cfg.n_layer, f"{a}.feed_forward_length": cfg.n_ff,
          f"{a}.rope.dimension_count": cfg.n_rot, f"{a}.attention.head_count": cfg.n_head,
          f"{a}.attention.head_count_kv": cfg.n_head_kv, f"{a}.attention.layer_norm_rms_epsilon": cfg.rms_eps,
          f"{a}.rope.freq_base": cfg.rope_base, f"{a}.hidden_activation": cfg.ffn_act}
    if ckpt is not None:
        md.update(_provenance(ckpt, str(ckpt.path)))
    return md


def _provenance(ckpt: Checkpoint, given: str) -> dict:
    repo, rev = ckpt.repo_id(), ckpt.revision()
    url = f"https://huggingface.co/{repo}" + (f"/tree/{rev}" if rev else "") if repo else ckpt.path.resolve().as_uri()
    md = {"general.source.url": url, KEY_PREFIX + "source": given,
          KEY_PREFIX + "source_format": f"Hugging Face checkpoint: {ckpt.describe_format()}"}
    if rev:
        md[KEY_PREFIX + "source_revision"] = rev
    return md


# ---- the tokenizer ------------------------------------------------------------------------------------------

def _tokenizer_kvs_hf(ckpt: Checkpoint, n_vocab: int) -> dict:
    from .hf_tokenizer import read_hf_tokenizer

    spec, _ = read_hf_tokenizer(ckpt.path, n_vocab, merges=True)
    S, U32, B = GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.BOOL
    kvs = {"tokenizer.ggml.model": ("gpt2", S), "tokenizer.ggml.pre": (_PRE[spec.pattern], S),
           "tokenizer.ggml.tokens": (list(spec.tokens), S),
           "tokenizer.ggml.token_type": (np.asarray(spec.token_types, np.int32), GGUFValueType.INT32),
           "tokenizer.ggml.merges": (list(spec.merges), S)}
    for key, value in (("bos_token_id", spec.bos_id), ("eos_token_id", spec.eos_id),
                       ("eot_token_id", spec.eot_id)):
        if value is not None:
            kvs[f"tokenizer.ggml.{key}"] = (int(value), U32)
    kvs["tokenizer.ggml.add_bos_token"] = (bool(spec.add_bos), B)
    kvs["tokenizer.ggml.add_eos_token"] = (False, B)
    if spec.chat_template is not None:
        kvs["tokenizer.chat_template"] = (spec.chat_template, S)
    return kvs


def _tokenizer_kvs_gguf(gf: GGUFFile) -> dict:
    """The source GGUF's tokenizer KVs, types kept, plus ``pre`` where a LLaMA-3 vocabulary lacks it."""
    from .tokenizer import read_vocab_spec

    kvs = {k: (v, gf.value_types[k][1] or gf.value_types[k][0]) for k, v in gf.metadata.items()
           if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" in kvs and "tokenizer.ggml.pre" not in kvs:
        spec = read_vocab_spec(gf.metadata, str(gf.path))
        kvs["tokenizer.ggml.pre"] = (_PRE[spec.pattern], GGUFValueType.STRING)
    return kvs


# ---- conversion ---------------------------------------------------------------------------------------------

def _open(src, revision: str | None, ffn_act: str | None):
    """-> (TensorSource, ModelConfig, tokenizer KVs, provenance KVs)."""
    path = resolve_model_path(src, None, revision)
    if path.is_dir():
        ckpt = Checkpoint(path)
        cfg = model_config(ckpt, ffn_act)
        prov = _provenance(ckpt, str(src))
        prov[KEY_PREFIX + "source_sha256"] = files_sha256(ckpt.files, named=True)
        return HFSource(ckpt), cfg, _tokenizer_kvs_hf(ckpt, cfg.n_vocab), prov
    gf = GGUFFile(path)
    emb = gf.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise ModelFormatError(path, "required 2-D tensor is missing or malformed", tensor="token_embd.weight")
    cfg = ModelConfig.from_metadata(gf.metadata, path, tied="output.weight" not in gf.tensors,
                                    n_vocab_tensor=int(emb.shape[1]), ffn_act=ffn_act)
    prov = {"general.source.url": path.resolve().as_uri(), KEY_PREFIX + "source": str(src),
            KEY_PREFIX + "source_format": f"GGUF ({cfg.arch})",
            KEY_PREFIX + "source_sha256": files_sha256([path], named=False)}
    return GGUFSource(gf), cfg, _tokenizer_kvs_gguf(gf), prov


def convert(src, out, weight_type: str = "i2_s", *, revision: str | None = None, ffn_act: str | None = None,
            name: str | None = None) -> ConvertResult:
    """Convert ``src`` (checkpoint directory, hub repo id, or GGUF) to a GGUF of ``weight_type`` at ``out``."""
    from .testing.gguf_writer import GGUFWriter

    if weight_type not in TYPES:
        raise ConfigError(f"--type must be one of {', '.join(TYPES)}, got {weight_type!r}")
    source, cfg, tok_kvs, prov = _open(src, revision, ffn_act)
    arch = ARCH[weight_type]
    w = GGUFWriter()
    md = model_metadata(cfg, arch=arch)
    if name:
        md["general.name"] = name
    md.update({"general.file_type": FILE_TYPE[weight_type], "general.quantization_version": 2,
               "general.quantized_by": f"bitnet-batch {__version__}", KEY_PREFIX + "type": weight_type})
    md.update(prov)
    for key, value in md.items():
        vtype = (GGUFValueType.UINT32 if isinstance(value, int) and not isinstance(value, bool) else
                 GGUFValueType.FLOAT32 if isinstance(value, float) else None)
        w.add_kv(key, value, vtype)
    for key, (value, vtype) in tok_kvs.items():
        w.add_kv(key, value, vtype)
    n_tensors, fallback = _add_tensors(w, source, cfg, weight_type)
    out = Path(out)
    w.write(out)
    return ConvertResult(out, weight_type, arch, n_tensors, tuple(fallback), out.stat().st_size,
                         tuple(_warnings(cfg, arch)))


def _warnings(cfg: ModelConfig, arch: str) -> list[str]:
    """Where the file and the other engines part ways (bitnet-batch runs the file as its source)."""
    out = []
    if not cfg.tied_lm_head:
        out.append("the lm_head is not tied to the embedding: output.weight is written, but bitnet.cpp and mainline "
                   "llama.cpp always use token_embd as the lm_head (llama.cpp refuses the file, bitnet.cpp ignores "
                   "output.weight)")
    if arch == "bitnet" and cfg.ffn_act != "silu":
        out.append(f"mainline llama.cpp's 'bitnet' graph hard-codes a SiLU FFN and ignores "
                   f"{arch}.hidden_activation = {cfg.ffn_act!r}: it will run the file, with the wrong activation")
    if arch == "bitnet-b1.58" and cfg.ffn_act != "relu2":
        out.append(f"bitnet.cpp's 'bitnet-b1.58' graph uses relu^2, not {cfg.ffn_act!r}")
    return out


def _add_tensors(w, source: TensorSource, cfg: ModelConfig, weight_type: str) -> tuple[int, list[str]]:
    """Add every tensor in the reference files' order; -> (tensor count, projections that fell back)."""
    d, v = cfg.n_embd, cfg.n_vocab
    count = 0

    def add(name, data, shape, typ):
        nonlocal count
        w.add_tensor(name, data, shape, typ)
        count += 1

    def matrix(name):
        a, kind = source.matrix(name, v, d)

        def chunks():                     # ~64 MB of rows at a time, their mapped pages dropped once written
            rows = max(1, (64 << 20) // max(1, a[0].nbytes))
            for lo in range(0, v, rows):
                yield np.ascontiguousarray(a[lo:lo + rows]).reshape(-1).view(np.uint8)
                source.release(name)
        add(name, chunks, (d, v), _EMB_TYPES[kind])
    matrix("token_embd.weight")
    add("output_norm.weight", lambda: source.vector("output_norm.weight", d), (d,), GGMLType.F32)
    if not cfg.tied_lm_head:
        matrix("output.weight")
    fallback, shapes = [], _shapes(cfg)
    norm_len = {"attn_norm": d, "attn_sub_norm": cfg.q_dim, "ffn_norm": d, "ffn_sub_norm": cfg.n_ff}
    for i in range(cfg.n_layer):
        for part in LAYER_ORDER:
            name = f"blk.{i}.{part}.weight"
            if part in norm_len:
                add(name, lambda name=name, n=norm_len[part]: source.vector(name, n), (norm_len[part],), GGMLType.F32)
                continue
            n_in, n_out = shapes[part]
            if _add_projection(add, source, name, n_in, n_out, weight_type):
                fallback.append(name)
    return count, fallback


def _add_projection(add, source: TensorSource, name: str, n_in: int, n_out: int, weight_type: str) -> bool:
    """Add one projection (and its ``.scale`` tensor for arch bitnet); True when it fell back to F32 / F16."""
    scale = {}                                    # the weight's producer leaves the scale for the .scale tensor

    def produce(encode):
        def run():
            t, alpha = _ternary(source, name, n_in, n_out)
            source.release(name)
            scale["alpha"] = alpha
            return encode(t, alpha)
        return run

    fits = n_in % BLOCK[weight_type] == 0
    if weight_type == "i2_s":
        if fits:
            add(name, produce(quants.pack_i2s), (n_in, n_out), GGMLType.I2_S)
        else:                                     # exact: {-a, 0, +a} in F32
            add(name, produce(lambda t, a: t.astype(np.float32) * a), (n_in, n_out), GGMLType.F32)
        return not fits
    if weight_type in ("tq2_0", "tq1_0") and fits:
        pack = quants.pack_tq2_0 if weight_type == "tq2_0" else quants.pack_tq1_0
        add(name, produce(lambda t, a: pack(t, 1.0)), (n_in, n_out),
                     GGMLType.TQ2_0 if weight_type == "tq2_0" else GGMLType.TQ1_0)
    else:                                         # exact: ternary values in F16, the scale separately
        add(name, produce(lambda t, a: t.astype(np.float32)), (n_in, n_out), GGMLType.F16)
    add(name[: -len(".weight")] + ".scale", lambda: np.array([scale["alpha"]], np.float32), (1,),
                 GGMLType.F32)
    return weight_type != "f16" and not fits
