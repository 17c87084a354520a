"""`bitnet-batch inspect`: what a GGUF holds and what running it costs, without loading the weights."""
from __future__ import annotations

from collections import Counter

from .config import ModelConfig
from .engine.kv_cache import kv_bytes_per_token
from .errors import ModelFormatError
from .model.gguf import GGMLType, GGUFFile
from .model.hub import resolve_model_path


def _tname(typ: int) -> str:
    try:
        return GGMLType(typ).name
    except ValueError:
        return f"type {typ}"


def describe(model, *, filename=None) -> dict:
    path = resolve_model_path(model, filename)
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
            cfg = ModelConfig.from_metadata(md, path, tied="output.weight" not in gf.tensors,
                                            n_vocab_tensor=int(emb.shape[1]))
        except ModelFormatError as e:
            info["config_error"] = str(e)
        else:
            info["config"] = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
            ternary = sum(t.nbytes for n, t in gf.tensors.items() if n.startswith("blk.") and len(t.shape) == 2)
            per_tok = kv_bytes_per_token(cfg.n_layer, cfg.kv_dim)
            info["memory"] = {"ternary_weights_mb": round(ternary / 2**20, 1),
                              "embedding_mb": round(emb.nbytes / 2**20, 1),
                              "kv_cache_kb_per_token": round(per_tok / 1024, 1),
                              "kv_cache_mb_full_context": round(per_tok * cfg.n_ctx / 2**20, 1),
                              "kv_cache_kb_per_token_f16": round(per_tok / 2 / 1024, 1)}
    else:
        info["config"] = None      # a weightless (tokenizer-only) GGUF
    if md.get("tokenizer.ggml.model") is not None:
        from .tokenizer import tokenizer_from_metadata

        tok = tokenizer_from_metadata(md, source=str(path))
        info["tokenizer"] = {"model": md.get("tokenizer.ggml.model"), "pre": md.get("tokenizer.ggml.pre"),
                             "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                             "eot_id": tok.eot_id, "add_bos": tok.add_bos, "eog_ids": sorted(tok.eog_ids),
                             "n_merges": len(md.get("tokenizer.ggml.merges", []))}
        info["chat_template"] = md.get("tokenizer.chat_template")
        info["chat_format_used"] = tok.render_chat([{"role": "system", "content": "S"},
                                                    {"role": "user", "content": "U"}])
    info["metadata"] = {k: v for k, v in md.items() if not k.startswith("tokenizer.ggml.")}
    return info


def format_description(info: dict) -> str:
    lines = [f"file      {info['path']} ({info['file_bytes'] / 2**20:.1f} MiB, GGUF v{info['gguf_version']})",
             f"tensors   {info['n_tensors']}: " + ", ".join(f"{n} x {t}" for t, n in info["tensor_types"].items())]
    cfg = info.get("config")
    if cfg:
        lines.append(f"arch      {cfg['arch']} '{cfg['name']}': {cfg['n_layer']} layers, hidden {cfg['n_embd']}, "
                     f"heads {cfg['n_head']}/{cfg['n_head_kv']} x {cfg['head_dim']}, ffn {cfg['n_ff']} "
                     f"({cfg['ffn_act']}), vocab {cfg['n_vocab']}, context {cfg['n_ctx']}")
        lines.append(f"          rope base {cfg['rope_base']:g} over {cfg['n_rot']} dims, rms eps {cfg['rms_eps']:g}, "
                     f"lm_head {'tied to token_embd' if cfg['tied_lm_head'] else 'output.weight'}")
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
        lines.append(f"chat      {info['chat_format_used']!r}")
        if info.get("chat_template"):
            lines.append(f"template  {info['chat_template'][:200]!r}")
    lines.append("tensors:")
    for t in info["tensors"]:
        lines.append(f"  {t['name']:40s} {str(t['shape']):>16s} {t['type']:6s} {t['bytes']:>12,d} B")
    return "\n".join(lines)
