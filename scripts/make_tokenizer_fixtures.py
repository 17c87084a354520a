"""Tokenizer fixtures from llama.cpp's own vocabulary tests (tests/data/tokenizer).

llama.cpp ships, for each tokenizer family, a weightless GGUF (``models/ggml-vocab-NAME.gguf``) with test strings
(``.inp``) and the ids Hugging Face's tokenizer gives for them (``.out``, made by ``convert_hf_to_gguf_update.py``);
they are in llama.cpp's source tree (e.g. the llama-cpp-python sdist's ``vendor/llama.cpp/models``, MIT licence).

- ``ggml-vocab-llama-spm.gguf`` (SentencePiece, 32000 tokens, 724 KB): copied as is with its .inp / .out.
- ``ggml-vocab-gemma-4.gguf`` (15.8 MB; Gemma's SentencePiece-style BPE, the family of BitNet-embedding-270M's
  vocabulary) likewise goes into ``gemma4-vocab-subset.json``.
- ``ggml-vocab-qwen2.gguf`` is 5.9 MB; what the qwen2 tests need of it goes into ``qwen2-vocab-subset.json``: the
  tokens that occur as a substring of some pre-token of the test strings (after NFC and the qwen2 split regex),
  all 256 byte tokens and the special tokens, at their real ids, and the merges between them, in rank order. BPE
  inside a pre-token can only ever form substrings of it, so on these strings the subset tokenizes exactly as the
  full vocabulary does; the tests fill the other ids with unused placeholders.

    python scripts/make_tokenizer_fixtures.py /path/to/llama.cpp/models --out tests/data/tokenizer
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import unicodedata
from pathlib import Path

import regex

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitnet_batch.model.gguf import GGUFFile                         # noqa: E402
from bitnet_batch.testing.models import bytes_to_unicode             # noqa: E402
from bitnet_batch.tokenizer import QWEN2_PATTERN, TOKEN_NORMAL       # noqa: E402

SEPARATOR = "\n__ggml_vocab_test__\n"


def read_cases(models: Path, name: str) -> list[tuple[str, list[int]]]:
    inp = (models / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
    out = (models / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    inp = inp[:-1] if inp and inp[-1] == "" else inp
    if len(out) < len(inp):
        raise SystemExit(f"{name}: {len(inp)} inputs but {len(out)} outputs")
    return [(text, [int(x) for x in ids.split()]) for text, ids in zip(inp, out)]


def qwen2_subset(models: Path) -> dict:
    gf = GGUFFile(models / "ggml-vocab-qwen2.gguf")
    md = gf.metadata
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    cases = read_cases(models, "qwen2")
    b2u = bytes_to_unicode()
    pieces = set()
    for text, _ in cases:
        for word in regex.findall(QWEN2_PATTERN, unicodedata.normalize("NFC", text)):
            pieces.add("".join(b2u[b] for b in word.encode("utf-8")))
    keep = {}
    for i, t in enumerate(tokens):
        if types[i] != TOKEN_NORMAL or len(t) == 1 or any(t in p for p in pieces):
            keep[i] = t
    return _subset("ggml-vocab-qwen2.gguf", md, keep, cases)


def _subset(file: str, md: dict, keep: dict, cases) -> dict:
    """The fixture of a vocabulary file's subset: the kept tokens (id -> text), the types of the kept non-normal
    ones, the merges between kept tokens, the tokenizer metadata (scalars, no chat template) and the test cases."""
    tokens, types, merges = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"], md["tokenizer.ggml.merges"]
    kept_text = set(keep.values())
    sub_merges = [m for m in merges if m.replace(" ", "", 1) in kept_text
                  and all(part in kept_text for part in m.split(" ", 1))]
    return {"source": f"llama.cpp models/{file} (subset, see scripts/make_tokenizer_fixtures.py)",
            "n_vocab": len(tokens), "tokens": {str(i): t for i, t in keep.items()},
            "token_types": {str(i): int(types[i]) for i in keep if types[i] != TOKEN_NORMAL},
            "merges": sub_merges,
            "metadata": {k: v for k, v in md.items() if k.startswith("tokenizer.") and isinstance(v, (int, str, bool))
                         and k != "tokenizer.chat_template"},
            "cases": [{"text": t, "ids": ids} for t, ids in cases]}


def gemma_subset(models: Path) -> dict:
    """The same for ``ggml-vocab-gemma-4.gguf`` (SentencePiece-style BPE over the whole text, spaces as U+2581): the
    tokens that are substrings of a normalised test string, the byte and special tokens, the merges between them."""
    md = GGUFFile(models / "ggml-vocab-gemma-4.gguf").metadata
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    cases = read_cases(models, "gemma-4")
    texts = [t.replace(" ", "\u2581") for t, _ in cases]
    keep = {}
    for i, t in enumerate(tokens):
        if types[i] != TOKEN_NORMAL or (t.startswith("<0x") and len(t) == 6) or any(t in x for x in texts):
            keep[i] = t
    return _subset("ggml-vocab-gemma-4.gguf", md, keep, cases)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, help="llama.cpp's models/ directory")
    ap.add_argument("--out", type=Path, default=Path("tests/data/tokenizer"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".inp", ".out"):
        shutil.copyfile(a.models / f"ggml-vocab-llama-spm.gguf{suffix}", a.out / f"ggml-vocab-llama-spm.gguf{suffix}")
    sub = qwen2_subset(a.models)
    (a.out / "qwen2-vocab-subset.json").write_text(json.dumps(sub, ensure_ascii=False, indent=0) + "\n",
                                                   encoding="utf-8")
    gem = gemma_subset(a.models)
    (a.out / "gemma4-vocab-subset.json").write_text(json.dumps(gem, ensure_ascii=False, indent=0) + "\n",
                                                    encoding="utf-8")
    print(f"gemma4 subset: {len(gem['tokens'])} of {gem['n_vocab']} tokens, {len(gem['merges'])} merges")
    print(f"qwen2 subset: {len(sub['tokens'])} of {sub['n_vocab']} tokens, {len(sub['merges'])} merges, "
          f"{len(sub['cases'])} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
