"""A Hugging Face checkpoint's tokenizer files -> ``VocabSpec`` + the ``tokenizers.Tokenizer`` of its tokenizer.json.

- ``tokenizer.json`` is read by the ``tokenizers`` library itself (the encoder); its vocabulary, added tokens and
  components (queried from the loaded tokenizer, so the 7 MB LLaMA-3 file is not also parsed into Python objects)
  give the ``VocabSpec`` that ``Tokenizer`` decodes with. ``convert`` also needs the merges for GGUF
  ``tokenizer.ggml.merges``: only then is the file parsed as JSON. Only byte-level BPE is supported (a BPE model
  with a ByteLevel decoder, and the LLaMA-3 split regex or GPT-2's ByteLevel regex as pre-tokenizer), as for
  GGUF vocabularies.
- Token types: added tokens marked ``special`` are CONTROL, other added tokens USER_DEFINED, the rest NORMAL.
  Ids the files do not define up to the model's vocabulary size (embedding rows beyond the tokenizer) become
  ``[PAD{id}]`` tokens of type UNUSED, as llama.cpp's converter writes them.
- BOS / EOS: ``tokenizer_config.json`` ``bos_token`` / ``eos_token``, else ``generation_config.json`` /
  ``config.json`` ``bos_token_id`` / ``eos_token_id``; every id of a generation_config ``eos_token_id`` list
  ends generation. ``add_bos``: ``tokenizer_config.json`` ``add_bos_token``, else whether tokenizer.json's
  post-processor puts BOS first (LLaMA-3's TemplateProcessing does).
- Chat template: ``chat_template.jinja`` (newer transformers) or ``tokenizer_config.json`` ``chat_template`` (a
  string, or a list of named templates: "default" is taken).
"""
from __future__ import annotations

import json
from os import PathLike
from pathlib import Path

import numpy as np
import tokenizers

from .errors import TokenizerError
from .tokenizer import (LLAMA3_PATTERN, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED, VocabSpec)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: must hold a JSON object")
    return data


def _parts(node) -> list[dict]:
    """The members of a tokenizer.json Sequence component, or the component itself."""
    if not isinstance(node, dict):
        return []
    if node.get("type") != "Sequence":
        return [node]
    members = node.get("pretokenizers") or node.get("decoders") or node.get("processors") or []
    return [m for m in members if isinstance(m, dict)]


def _pattern(pre, path: Path) -> str:
    """"llama3" (LLaMA-3 split regex, then ByteLevel without its own regex) or "gpt2" (ByteLevel with its regex)."""
    parts = _parts(pre)
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return "gpt2"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True) \
            and not parts[1].get("add_prefix_space"):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_PATTERN and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert"):
            return "llama3"
    raise TokenizerError(f"{path}: pre_tokenizer {kinds} is not supported: only the LLaMA-3 regex split + ByteLevel "
                         "or GPT-2's ByteLevel (byte-level BPE vocabularies)")


def _merges(raw, path: Path) -> tuple[str, ...]:
    out = []
    for m in raw or []:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            out.append(f"{m[0]} {m[1]}")
        else:
            raise TokenizerError(f"{path}: model.merges entry {m!r} is not 'left right' or [left, right]")
    if not out:
        raise TokenizerError(f"{path}: model.merges is empty")
    return tuple(out)


def _vocabulary(hf: tokenizers.Tokenizer, path: Path, n_vocab: int | None) -> tuple[list[str], np.ndarray]:
    """Token text by id and token types, padded to n_vocab."""
    vocab = hf.get_vocab(with_added_tokens=True)
    added = hf.get_added_tokens_decoder()              # id -> AddedToken
    if not vocab:
        raise TokenizerError(f"{path}: the vocabulary is empty")
    n_tok = max(vocab.values()) + 1
    n = n_tok if n_vocab is None else n_vocab
    if n_tok > n:
        raise TokenizerError(f"{path}: token ids go up to {n_tok - 1}, but the model's vocabulary has {n} entries")
    tokens: list[str | None] = [None] * n
    types = np.full(n, TOKEN_NORMAL, np.int32)
    for text, i in vocab.items():
        tokens[i] = text
    for i, a in added.items():
        tokens[i] = a.content
        types[i] = TOKEN_CONTROL if a.special else TOKEN_USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = TOKEN_UNUSED
    return tokens, types


def _component(component) -> dict | None:
    """A loaded tokenizer component (pre-tokenizer, decoder, post-processor) as its tokenizer.json object."""
    return None if component is None else json.loads(component.__getstate__())


def _token_id(value, hf: tokenizers.Tokenizer, source: Path, key: str) -> int | None:
    """tokenizer_config's "<|x|>" or {"content": "<|x|>"} -> its id."""
    if value is None:
        return None
    text = value.get("content") if isinstance(value, dict) else value
    i = hf.token_to_id(text) if isinstance(text, str) else None
    if i is None:
        raise TokenizerError(f"{source}: {key} {text!r} is not a token of the vocabulary")
    return i


def _id_list(value, source: Path, key: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{source}: {key} must be an integer or a list of integers, got {value!r}")
    return tuple(values)


def _post_processor_adds(post: dict | None, bos_text: str | None) -> bool:
    """Whether tokenizer.json's post-processor puts ``bos_text`` before a single sequence."""
    for p in _parts(post):
        single = p.get("single") if p.get("type") == "TemplateProcessing" else None
        if single:
            first = single[0].get("SpecialToken") if isinstance(single[0], dict) else None
            return bool(first) and first.get("id") == bos_text
    return False


def _chat_template(directory: Path, tc: dict) -> str | None:
    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    value = tc.get("chat_template")
    if isinstance(value, list):             # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default", next(iter(named.values()), None))
    return value if isinstance(value, str) else None


def read_hf_tokenizer(directory: str | PathLike, n_vocab: int | None = None, *, merges: bool = False
                      ) -> tuple[VocabSpec, tokenizers.Tokenizer]:
    """(VocabSpec, encoder) of a checkpoint directory's tokenizer files; see the module docstring. The spec's
    merges are read only with ``merges=True`` (``Tokenizer`` encodes with the file's own BPE model)."""
    directory = Path(directory)
    path = directory / TOKENIZER_JSON
    if not path.is_file():
        raise TokenizerError(f"{path}: missing (the checkpoint's tokenizer)")
    try:
        hf = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:          # tokenizers raises plain Exception
        raise TokenizerError(f"{path}: the tokenizers library cannot read it: {e}") from None
    if type(hf.model).__name__ != "BPE":
        raise TokenizerError(f"{path}: tokenizer model {type(hf.model).__name__} is not supported; only byte-level "
                             "BPE")
    if "ByteLevel" not in [d.get("type") for d in _parts(_component(hf.decoder))]:
        raise TokenizerError(f"{path}: decoder is not ByteLevel; only byte-level BPE vocabularies are supported")
    pattern = _pattern(_component(hf.pre_tokenizer), path)
    tokens, types = _vocabulary(hf, path, n_vocab)
    tc_path, gc_path, cfg_path = directory / TOKENIZER_CONFIG, directory / GENERATION_CONFIG, directory / "config.json"
    tc, gc, cfg = _read_json(tc_path), _read_json(gc_path), _read_json(cfg_path)
    bos = _token_id(tc.get("bos_token"), hf, tc_path, "bos_token")
    if bos is None:
        bos = next(iter(_id_list(gc.get("bos_token_id", cfg.get("bos_token_id")), gc_path, "bos_token_id")), None)
    eog = _id_list(gc.get("eos_token_id", cfg.get("eos_token_id")), gc_path, "eos_token_id")
    eos = _token_id(tc.get("eos_token"), hf, tc_path, "eos_token")
    eos = eos if eos is not None else next(iter(eog), None)
    add_bos = tc.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise TokenizerError(f"{tc_path}: add_bos_token must be true or false, got {add_bos!r}")
    if add_bos is None:
        bos_text = tokens[bos] if bos is not None and 0 <= bos < len(tokens) else None
        add_bos = _post_processor_adds(_component(hf.post_processor), bos_text)
    spec = VocabSpec(source=str(path), tokens=tuple(tokens), token_types=types,
                     merges=_merges(_read_json(path).get("model", {}).get("merges"), path) if merges else (),
                     pattern=pattern, bos_id=bos, eos_id=eos, eot_id=hf.token_to_id("<|eot_id|>"), eom_id=None,
                     add_bos=bool(add_bos and bos is not None), chat_template=_chat_template(directory, tc),
                     extra_eog_ids=eog)
    hf.no_padding()
    hf.no_truncation()
    hf.encode_special_tokens = True     # special-token text in user text stays text (parse_special opts in)
    return spec, hf
