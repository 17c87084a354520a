"""The embedding models' tokenizer families against llama.cpp's own vocabulary test cases (tests/data/tokenizer, from
llama.cpp's models/ directory, MIT licence; see scripts/make_tokenizer_fixtures.py):

- Qwen2 / Qwen3 byte-level BPE (``tokenizer.ggml.pre = "qwen2"``): ``ggml-vocab-qwen2.gguf``'s 46 cases, on the
  subset of its vocabulary that those strings can reach;
- SentencePiece (``tokenizer.ggml.model = "llama"``, scores and byte fallback, as mainline llama.cpp converts
  Gemma): ``ggml-vocab-llama-spm.gguf`` and its 46 cases, the real file.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from bitnet_batch.errors import InputError, TokenizerError
from bitnet_batch.model.gguf import GGUFFile
from bitnet_batch.spm_tokenizer import SpmTokenizer
from bitnet_batch.tokenizer import TOKEN_NORMAL, TOKEN_UNUSED, Tokenizer, tokenizer_from_metadata

TOK = Path(__file__).parent / "data" / "tokenizer"
SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="module")
def qwen2():
    md, cases = _subset_metadata("qwen2-vocab-subset.json")
    return tokenizer_from_metadata(md, source="qwen2-subset"), cases


def test_qwen2_matches_llama_cpp_cases(qwen2):
    tok, cases = qwen2
    assert isinstance(tok, Tokenizer) and tok.pattern == "qwen2" and len(cases) == 46
    bad = [(c["text"], tok.encode(c["text"]), c["ids"]) for c in cases if tok.encode(c["text"]) != c["ids"]]
    assert not bad, bad[:3]
    assert tok.encode_batch([c["text"] for c in cases]) == [c["ids"] for c in cases]
    for c in cases:                             # lossless (every case is NFC already)
        assert tok.decode(c["ids"]) == c["text"]


def test_qwen2_rules(qwen2):
    tok, _ = qwen2
    # no BOS by default although the vocabulary names one (llama.cpp leaves add_bos false for qwen2)
    assert tok.bos_id == 151643 and tok.add_bos is False and tok.eos_id == 151643
    # single digits, not runs of three as LLaMA-3
    assert tok.encode("3333") == [18, 18, 18, 18]
    # NFC first, as the Qwen2 tokenizer.json: a decomposed umlaut tokenizes as the composed one
    assert tok.encode("Fu\u0308hrer") == tok.encode("F\u00fchrer")
    # special-token text stays text unless asked for
    assert 151643 not in tok.encode("<|endoftext|>")
    assert tok.encode("<|endoftext|>", parse_special=True) == [151643]


@pytest.fixture(scope="module")
def spm():
    path = TOK / "ggml-vocab-llama-spm.gguf"
    inp = (TOK / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)[:-1]
    out = (TOK / "ggml-vocab-llama-spm.gguf.out").read_text(encoding="utf-8").split("\n")
    return tokenizer_from_metadata(GGUFFile(path).metadata, source=str(path)), [
        (t, [int(x) for x in ids.split()]) for t, ids in zip(inp, out)]


def test_spm_matches_llama_cpp_cases(spm):
    tok, cases = spm
    assert isinstance(tok, SpmTokenizer) and len(cases) == 46
    bad = [(text, tok.encode(text), ids) for text, ids in cases if tok.encode(text) != ids]
    assert not bad, bad[:3]
    assert tok.encode_batch([t for t, _ in cases]) == [ids for _, ids in cases]
    for text, ids in cases:
        assert tok.decode(ids) == text, text


def test_spm_rules(spm):
    tok, _ = spm
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_space_prefix) == (1, 2, True, True)
    assert tok.encode("Hello world", add_bos=True) == [1, 15043, 3186]
    # byte fallback: a character outside the vocabulary becomes its UTF-8 bytes
    ids = tok.encode("🦙")
    assert [tok.token_bytes(i) for i in ids[1:]] == [bytes([b]) for b in "🦙".encode()]
    assert tok.decode(ids) == "🦙"
    # control tokens are text unless parse_special; then the next fragment gets its own space prefix
    assert 1 not in tok.encode("<s>")
    assert tok.encode("<s>Hello", parse_special=True) == [1, 15043]
    assert tok.is_control(1) and not tok.is_control(15043)
    dec = tok.incremental_decoder()
    assert "".join(dec.push(i) for i in tok.encode(" ü 🦙")) + dec.flush() == "  ü 🦙"     # prefix space kept
    with pytest.raises(InputError, match="lone surrogate"):
        tok.encode("a\ud800")


def test_spm_metadata_errors(spm):
    md = dict(GGUFFile(TOK / "ggml-vocab-llama-spm.gguf").metadata)
    del md["tokenizer.ggml.scores"]
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores"):
        tokenizer_from_metadata(md, source="x")
    md = dict(GGUFFile(TOK / "ggml-vocab-llama-spm.gguf").metadata)
    md["tokenizer.ggml.scores"] = md["tokenizer.ggml.scores"][:10]
    with pytest.raises(TokenizerError, match="do not match"):
        tokenizer_from_metadata(md, source="x")
    md = dict(GGUFFile(TOK / "ggml-vocab-llama-spm.gguf").metadata)
    md["tokenizer.ggml.add_space_prefix"] = False
    assert tokenizer_from_metadata(md, source="x").encode("Hello") == [10994]


def _subset_metadata(name):
    sub = json.loads((TOK / name).read_text(encoding="utf-8"))
    n = sub["n_vocab"]
    tokens = [f"<unused-{i}>" for i in range(n)]
    types = np.full(n, TOKEN_UNUSED, np.int32)
    for i, t in sub["tokens"].items():
        tokens[int(i)] = t
        types[int(i)] = TOKEN_NORMAL
    for i, typ in sub["token_types"].items():
        types[int(i)] = typ
    md = dict(sub["metadata"], **{"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                                  "tokenizer.ggml.merges": sub["merges"]})
    return md, sub["cases"]


@pytest.fixture(scope="module")
def gemma():
    return _subset_metadata("gemma4-vocab-subset.json")


def test_gemma_bpe_matches_llama_cpp_cases(gemma):
    """Gemma's SentencePiece-style BPE (llama.cpp's "gemma4" model) on llama.cpp's cases (made with transformers'
    tokenizer), and the same vocabulary as bitnet.cpp's embedding converter writes Gemma's (model "gpt2", pre
    "default"): the same ids."""
    md, cases = gemma
    assert len(cases) == 46
    bitnet_style = dict(md, **{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default"})
    for meta in (md, bitnet_style):
        tok = tokenizer_from_metadata(meta, source="gemma4-subset")
        assert tok.pattern == "spm-bpe" and tok.add_bos and tok.bos_id == 2
        bad = [(c["text"], tok.encode(c["text"]), c["ids"]) for c in cases if tok.encode(c["text"]) != c["ids"]]
        assert not bad, bad[:3]
        for c in cases:
            assert tok.decode(c["ids"]) == c["text"]
    # a character outside the vocabulary falls back to its bytes
    ids = tok.encode("\u2603")
    assert [tok.token_bytes(i) for i in ids] == [bytes([b]) for b in "\u2603".encode()]
