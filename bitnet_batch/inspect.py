"""`bitnet-batch inspect`: what a GGUF or a Hugging Face checkpoint holds, where it came from, and what running it
costs, without loading the weights."""
from __future__ import annotations

from collections import Counter

from .config import ModelConfig
from .engine.kv_cache import kv_bytes_per_token
from .errors import ModelFormatError
from .errors import TokenizerError
from .model.embedding_models import EmbeddingModelConfig, is_embedding_arch
from .model.gguf import GGMLType, GGUFFile
from .model.hub import resolve_model_path

PROVENANCE_KEYS = ("general.source.url", "general.source.repo_url", "general.quantized_by")
CONVERT_PREFIX = "bitnet_batch.convert."


def _tname(typ: int) -> str:
    try:
        return GGMLType(typ).name
    except ValueError:
        return f"type {typ}"


def describe(model, *, filename=None) -> dict:
    path = resolve_model_path(model, filename)
    if path.is_dir():
        return _describe_checkpoint(path)
    gf = GGUFFile(path)
    md = gf.metadata
    info = {"path": str(path), "file_bytes": path.stat().st_size, "gguf_version": gf.version,
            "n_tensors": len(gf.tensors),
            "tensor_types": dict(Counter(_tname(t.ggml_type) for t in gf.tensors.values())),
            "tensors": [{"name": t.name, "shape": list(t.shape), "type": _tname(t.ggml_type),
                         "bytes": t.nbytes} for t in gf.tensors.values()]}
    emb = gf.tensors.get("token_embd.weight")
    if emb is not None and len(emb.shape) == 2:
        try:
            if is_embedding_arch(md):
                cfg = EmbeddingModelConfig.from_metadata(md, path, n_vocab_tensor=int(emb.shape[1]))
            else:
                cfg = ModelConfig.from_metadata(md, path, tied="output.weight" not in gf.tensors,
                                                n_vocab_tensor=int(emb.shape[1]))
        except ModelFormatError as e:
            info["config_error"] = str(e)
        else:
            ternary = sum(t.nbytes for n, t in gf.tensors.items() if n.startswith("blk.") and len(t.shape) == 2)
            _add_config(info, cfg, ternary, emb.nbytes)
    else:
        info["config"] = None      # a weightless (tokenizer-only) GGUF
    if md.get("tokenizer.ggml.model") is not None:
        from .tokenizer import tokenizer_from_metadata

        tok = tokenizer_from_metadata(md, source=str(path))
        _add_tokenizer(info, tok, md.get("tokenizer.ggml.model"), md.get("tokenizer.ggml.pre"),
                       len(md.get("tokenizer.ggml.merges", [])))
    source = {k: md[k] for k in PROVENANCE_KEYS if k in md}
    source.update({k[len(CONVERT_PREFIX):]: v for k, v in md.items() if k.startswith(CONVERT_PREFIX)})
    if source:
        info["source"] = source
    info["metadata"] = {k: v for k, v in md.items() if not k.startswith("tokenizer.ggml.")}
    return info


def _add_config(info: dict, cfg: ModelConfig, ternary_bytes: int, embedding_bytes: int) -> None:
    info["config"] = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    per_tok = kv_bytes_per_token(cfg.n_layer, cfg.kv_dim)
    info["memory"] = {"ternary_weights_mb": round(ternary_bytes / 2**20, 1),
                      "embedding_mb": round(embedding_bytes / 2**20, 1),
                      "kv_cache_kb_per_token": round(per_tok / 1024, 1),
                      "kv_cache_mb_full_context": round(per_tok * cfg.n_ctx / 2**20, 1),
                      "kv_cache_kb_per_token_f16": round(per_tok / 2 / 1024, 1)}
    if getattr(cfg, "embedding_only", False):
        swa = [i for i, s in enumerate(cfg.swa_layers) if s]
        info["embedding"] = {"pooling": cfg.pooling, "dim": cfg.n_embd, "head_dim": cfg.head_dim,
                             "attn_scale": cfg.attn_scale, "embd_scale": cfg.embd_scale,
                             "sliding_window": cfg.sliding_window, "sliding_layers": swa,
                             "rope_base_swa": cfg.rope_base_swa}


def _add_tokenizer(info: dict, tok, model: str | None, pre: str | None, n_merges: int) -> None:
    info["tokenizer"] = {"model": model, "pre": pre, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                         "eos_id": tok.eos_id, "eot_id": tok.eot_id, "add_bos": tok.add_bos,
                         "eog_ids": sorted(tok.eog_ids), "n_merges": n_merges}
    info["chat_template"] = tok.chat_template
    info["chat_format"] = tok.chat_format
    try:
        info["chat_format_used"] = tok.render_chat([{"role": "system", "content": "S"},
                                                    {"role": "user", "content": "U"}])
    except TokenizerError:                 # a SentencePiece vocabulary without a template: no chat format
        info["chat_format_used"] = None


def _describe_checkpoint(path) -> dict:
    """``describe`` for a Hugging Face checkpoint directory (``model/hf.py``)."""
    from .hf_tokenizer import read_hf_tokenizer
    from .model.hf import Checkpoint, model_config
    from .tokenizer import Tokenizer

    ckpt = Checkpoint(path)
    infos = [shard.tensors[n] for shard in ckpt.shards for n in shard.tensors]
    info = {"path": str(path), "format": "Hugging Face checkpoint", "weights": ckpt.describe_format(),
            "file_bytes": sum(f.stat().st_size for f in ckpt.files),
            "files": [{"name": f.name, "bytes": f.stat().st_size} for f in ckpt.files], "n_tensors": len(infos),
            "tensor_types": dict(Counter(t.dtype for t in infos)),
            "tensors": [{"name": t.name, "shape": list(t.shape), "type": t.dtype, "bytes": t.nbytes} for t in infos]}
    info["source"] = {k: v for k, v in (("repo_id", ckpt.repo_id()), ("revision", ckpt.revision())) if v}
    try:
        cfg = model_config(ckpt)
    except ModelFormatError as e:
        info["config_error"] = str(e)
        cfg = None
    else:
        ternary = sum(t.nbytes for t in infos if t.name.startswith("model.layers.") and len(t.shape) == 2)
        _add_config(info, cfg, ternary, ckpt.info("model.embed_tokens.weight")[1].nbytes)
    if (ckpt.path / "tokenizer.json").is_file():
        spec, hf = read_hf_tokenizer(ckpt.path, cfg.n_vocab if cfg else None, merges=True)
        tok = Tokenizer(spec, hf)
        _add_tokenizer(info, tok, "tokenizer.json (byte-level BPE)", {"llama3": "llama-bpe", "gpt2": "gpt-2"}
                       [spec.pattern], len(spec.merges))
    info["metadata"] = ckpt.config
    return info


def format_description(info: dict) -> str:
    if "gguf_version" in info:
        lines = [f"file      {info['path']} ({info['file_bytes'] / 2**20:.1f} MiB, GGUF v{info['gguf_version']})"]
    else:
        lines = [f"dir       {info['path']} ({info['file_bytes'] / 2**20:.1f} MiB, "
                 f"{info['format']}: {info['weights']})",
                 "files     " + ", ".join(f["name"] for f in info["files"])]
    source = info.get("source")
    if source:
        lines.append("source    " + ", ".join(f"{k} {v}" for k, v in source.items()))
    lines.append(f"tensors   {info['n_tensors']}: " + ", ".join(f"{n} x {t}" for t, n in info["tensor_types"].items()))
    cfg = info.get("config")
    if cfg:
        lines.append(f"arch      {cfg['arch']} '{cfg['name']}': {cfg['n_layer']} layers, hidden {cfg['n_embd']}, "
                     f"heads {cfg['n_head']}/{cfg['n_head_kv']} x {cfg['head_dim']}, ffn {cfg['n_ff']} "
                     f"({cfg['ffn_act']}), vocab {cfg['n_vocab']}, context {cfg['n_ctx']}")
        emb = info.get("embedding")
        head = (f"no lm_head: embedding model, {emb['pooling']} pooling, {emb['dim']} dims" if emb else
                f"lm_head {'tied to token_embd' if cfg['tied_lm_head'] else 'output.weight'}")
        lines.append(f"          rope base {cfg['rope_base']:g} over {cfg['n_rot']} dims, rms eps {cfg['rms_eps']:g}, "
                     f"{head}")
        if emb:
            window = (f"sliding window {emb['sliding_window']} on layers {emb['sliding_layers']} (rope base "
                      f"{emb['rope_base_swa']:g})" if emb["sliding_layers"] else "full attention in every layer")
            lines.append(f"          attention scale {emb['attn_scale']:.6g}, embedding scale {emb['embd_scale']:g}, "
                         f"{window}")
        m = info["memory"]
        lines.append(f"memory    ternary weights {m['ternary_weights_mb']} MiB, embedding {m['embedding_mb']} MiB, "
                     f"KV cache {m['kv_cache_kb_per_token']} KiB/token ({m['kv_cache_mb_full_context']} MiB per full "
                     f"context sequence; {m['kv_cache_kb_per_token_f16']} KiB/token with --kv-dtype f16)")
    elif "config_error" in info:
        lines.append(f"config    {info['config_error']}")
    else:
        lines.append("config    no weights (tokenizer-only GGUF)")
    tok = info.get("tokenizer")
    if tok:
        lines.append(f"tokenizer {tok['model']} pre={tok['pre']} vocab {tok['vocab_size']}, {tok['n_merges']} merges, "
                     f"bos {tok['bos_id']} eos {tok['eos_id']} eot {tok['eot_id']} add_bos {tok['add_bos']}")
        lines.append(f"chat      ({info['chat_format']} format) {info['chat_format_used']!r}")
        if info.get("chat_template"):
            lines.append(f"template  {info['chat_template'][:200]!r}")
    lines.append("tensors:")
    for t in info["tensors"]:
        lines.append(f"  {t['name']:48s} {str(t['shape']):>16s} {t['type']:6s} {t['bytes']:>12,d} B")
    return "\n".join(lines)
