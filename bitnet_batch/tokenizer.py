"""GGUF vocabulary -> ``tokenizers.Tokenizer``; lossless incremental decoding; the BitNet chat format.

Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are supported; that covers
BitNet b1.58 2B4T (the LLaMA-3 vocabulary) and the tiny reference GGUFs under ``tests/data``.

Design notes:
- Encoding is done by a HF ``tokenizers`` fast tokenizer built in memory from the GGUF tokens and
  merges (nothing is cached on disk). The BPE model runs with ``ignore_merges=True``: a whole pre-token
  that is in the vocabulary is taken as is, which is what tiktoken (and so LLaMA-3) does. 588 LLaMA-3
  tokens such as " việc" are not reachable through the merge list, so ``ignore_merges=False`` would
  split them.
- Decoding does not go through ``tokenizers``: every id maps to its raw bytes once (``token_bytes``),
  a decode joins bytes and decodes UTF-8 with U+FFFD for invalid sequences, exactly like llama.cpp's
  ``token_to_piece`` pieces concatenated. This is lossless and lets the incremental decoder hold back
  partial UTF-8 characters.
- Special (CONTROL) token text inside user text is never parsed as a control token unless the caller
  asks for it with ``parse_special=True``; user data must not be able to inject ``<|eot_id|>``.
"""
from __future__ import annotations

import codecs
import functools
import re
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter
from os import PathLike
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from bitnet_batch.errors import InputError, TokenizerError

# GGUF metadata keys (llama.cpp names).
KEY_MODEL = "tokenizer.ggml.model"
KEY_PRE = "tokenizer.ggml.pre"
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_TOKEN_TYPE = "tokenizer.ggml.token_type"
KEY_MERGES = "tokenizer.ggml.merges"
KEY_BOS = "tokenizer.ggml.bos_token_id"
KEY_EOS = "tokenizer.ggml.eos_token_id"
KEY_EOT = "tokenizer.ggml.eot_token_id"
KEY_EOM = "tokenizer.ggml.eom_token_id"
KEY_ADD_BOS = "tokenizer.ggml.add_bos_token"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"

# llama.cpp ``llama_token_type`` values stored in tokenizer.ggml.token_type.
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

#: LLaMA-3 pre-tokenizer regex (meta-llama ``tokenizer.py`` / BitNet ``gpu/tokenizer.py`` ``pat_str``).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Qwen2 / Qwen3 pre-tokenizer regex (Qwen2 ``tokenizer.json``, as quoted in llama.cpp ``llama-vocab.cpp`` for
#: LLAMA_VOCAB_PRE_TYPE_QWEN2): LLaMA-3's with single digits (\p{N}) instead of runs of up to three.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_LLAMA3 = ("llama-bpe", "llama3", "llama-v3")
_PRE_GPT2 = ("default", "gpt2", "gpt-2")
_PRE_QWEN2 = ("qwen2", "deepseek-r1-qwen")
SUPPORTED_PRE = _PRE_LLAMA3 + _PRE_GPT2 + _PRE_QWEN2
SUPPORTED_MODELS = ("gpt2", "gemma4")
#: tokenizer.ggml.model values built by ``spm_tokenizer`` (SentencePiece vocabularies: scores, byte fallback).
SPM_MODELS = ("llama",)

# Token texts that end generation when present (llama.cpp adds these to its EOG set by text).
_EOG_TEXTS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")
_LLAMA3_MARKER = "<|begin_of_text|>"
_LLAMA3_VOCAB_SIZE = 128256

#: Chat roles accepted by ``apply_chat_template`` and the header text each one gets.
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


@functools.cache
def _byte_level_table() -> dict[int, int]:
    """GPT-2 ``bytes_to_unicode`` inverted: codepoint of the printable stand-in char -> byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[256 + extra] = b  # non-printable byte b is written as chr(256 + k)
            extra += 1
    return table


@functools.cache
def _translate_table() -> dict[int, int]:
    """str.translate table: byte-level stand-in -> its byte; any other char below 256 -> U+FFFF.

    U+FFFF (like every char >= 256 that is not a stand-in) makes the latin-1 encode fail, which sends
    the token to the slow path instead of silently producing a wrong byte.
    """
    table = {cp: 0xFFFF for cp in range(256)}
    table.update(_byte_level_table())
    return table


def _normal_token_bytes(text: str) -> bytes:
    """Raw bytes of a byte-level BPE token ("Ġworld" -> b" world").

    A char outside the byte-level alphabet (a malformed vocabulary) contributes its own UTF-8 bytes.
    """
    try:
        return text.translate(_translate_table()).encode("latin-1")
    except UnicodeEncodeError:
        table = _byte_level_table()
        return b"".join(bytes([table[ord(c)]]) if ord(c) in table else c.encode("utf-8") for c in text)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _spm_piece_bytes(text: str) -> bytes:
    """Raw bytes of a SentencePiece piece: ``<0xXX>`` is that byte, U+2581 a space."""
    m = _BYTE_PIECE.fullmatch(text)
    return bytes([int(m.group(1), 16)]) if m else text.replace("\u2581", " ").encode("utf-8")


@dataclass(frozen=True)
class VocabSpec:
    """The tokenizer part of a GGUF's metadata, read through named keys and validated."""

    source: str
    """File (or label) the metadata came from; named in every error."""
    tokens: tuple[str, ...]
    """``tokenizer.ggml.tokens``: token text by id, byte-level form for normal tokens."""
    token_types: np.ndarray
    """``tokenizer.ggml.token_type`` (n_vocab,) int32; all NORMAL when the key is absent."""
    merges: tuple[str, ...]
    """``tokenizer.ggml.merges``: "left right" pairs in rank order."""
    pattern: str
    """"llama3", "gpt2" or "qwen2": which pre-tokenizer regex to use; "spm-bpe" for a SentencePiece-style BPE
    vocabulary (Gemma's: U+2581 for spaces, ``<0xXX>`` byte fallback, no pre-tokenizer)."""
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    add_bos: bool
    chat_template: str | None
    extra_eog_ids: tuple[int, ...] = ()
    """More end-of-generation ids (a Hugging Face generation_config.json's list of eos_token_id)."""

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if self.token_types.shape != (n,):
            raise TokenizerError(
                f"{self.source}: {KEY_TOKEN_TYPE} has {self.token_types.shape[0]} entries, "
                f"{KEY_TOKENS} has {n}"
            )
        for key, value in ((KEY_BOS, self.bos_id), (KEY_EOS, self.eos_id), (KEY_EOT, self.eot_id),
                           (KEY_EOM, self.eom_id), *(("eos_token_id", i) for i in self.extra_eog_ids)):
            if value is not None and not 0 <= value < n:
                raise TokenizerError(f"{self.source}: {key} must be in [0, {n}), got {value}")
        if self.pattern not in ("llama3", "gpt2", "qwen2", "spm-bpe"):
            raise TokenizerError(f"{self.source}: internal pattern name {self.pattern!r}")


def _require_str_list(metadata: Mapping[str, Any], key: str, source: str) -> tuple[str, ...]:
    value = metadata.get(key)
    if value is None:
        raise TokenizerError(f"{source}: missing GGUF metadata key {key!r}; cannot build the tokenizer")
    if isinstance(value, str) or not set(map(type, value)) <= {str}:
        raise TokenizerError(f"{source}: {key} must be an array of strings")
    if len(value) == 0:
        raise TokenizerError(f"{source}: {key} is empty")
    return tuple(value)


def _optional_id(metadata: Mapping[str, Any], key: str, source: str) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TokenizerError(f"{source}: {key} must be an integer, got {value!r}")
    return int(value)


def _select_pattern(metadata: Mapping[str, Any], tokens: Sequence[str], source: str) -> str:
    """Map ``tokenizer.ggml.pre`` to a regex family.

    When the key is absent (the official BitNet 2B4T GGUF) a LLaMA-3 vocabulary gets the LLaMA-3
    regex — what HF and Microsoft's reference use — instead of llama.cpp's 'default' fallback.
    """
    pre = metadata.get(KEY_PRE)
    if pre is None:
        looks_llama3 = _LLAMA3_MARKER in tokens or len(tokens) == _LLAMA3_VOCAB_SIZE
        return "llama3" if looks_llama3 else "gpt2"
    if pre in _PRE_LLAMA3:
        return "llama3"
    if pre in _PRE_GPT2:
        return "gpt2"
    if pre in _PRE_QWEN2:
        return "qwen2"
    raise TokenizerError(
        f"{source}: unsupported {KEY_PRE} {pre!r}; supported: {', '.join(SUPPORTED_PRE)}"
    )


def looks_sentencepiece_bpe(tokens: Sequence[str]) -> bool:
    """True for a SentencePiece-style BPE vocabulary stored as ``tokenizer.ggml.model = "gpt2"``: bitnet.cpp's
    embedding converter writes Gemma's vocabulary that way (``utils/convert-bitnet-embedding-to-gguf.py``: model
    "gpt2", pre "default", the tokens and merges of GemmaTokenizerFast). Such a vocabulary has U+2581 word tokens and
    ``<0xXX>`` byte tokens and none of byte-level BPE's "Ġ" tokens."""
    return "<0x0A>" in tokens and "\u2581the" in tokens and "\u0120the" not in tokens


def read_vocab_spec(metadata: Mapping[str, Any], source: str = "<metadata>") -> VocabSpec:
    """Validate the tokenizer keys of a GGUF metadata dict (see ``GGUFFile.metadata``)."""
    model = metadata.get(KEY_MODEL)
    if model is None:
        raise TokenizerError(f"{source}: missing GGUF metadata key {KEY_MODEL!r}")
    if model not in SUPPORTED_MODELS:
        raise TokenizerError(
            f"{source}: unsupported tokenizer model {KEY_MODEL}={model!r}; "
            f"supported: {', '.join(SUPPORTED_MODELS + SPM_MODELS)} (byte-level BPE, SentencePiece BPE, "
            "SentencePiece)"
        )
    tokens = _require_str_list(metadata, KEY_TOKENS, source)
    merges = _require_str_list(metadata, KEY_MERGES, source)
    raw_types = metadata.get(KEY_TOKEN_TYPE)
    types = (np.full(len(tokens), TOKEN_NORMAL, np.int32) if raw_types is None
             else np.asarray(raw_types).astype(np.int32).reshape(-1))
    bos = _optional_id(metadata, KEY_BOS, source)
    add_bos_raw = metadata.get(KEY_ADD_BOS)
    if add_bos_raw is not None and not isinstance(add_bos_raw, (bool, np.bool_)):
        raise TokenizerError(f"{source}: {KEY_ADD_BOS} must be a bool, got {add_bos_raw!r}")
    if add_bos_raw and bos is None:
        raise TokenizerError(f"{source}: {KEY_ADD_BOS} is true but {KEY_BOS} is missing")
    # Default True for gpt2/llama-bpe vocabularies, when there is a BOS to add; llama.cpp leaves add_bos false for
    # qwen2 (Qwen2 / Qwen3 vocabularies name <|endoftext|> as BOS but never prepend it).
    pattern = "spm-bpe" if model == "gemma4" or looks_sentencepiece_bpe(tokens) else _select_pattern(metadata, tokens,
                                                                                                      source)
    if add_bos_raw is not None:
        add_bos = bool(add_bos_raw)
    else:                                       # llama.cpp always prepends BOS for gemma4 vocabularies
        add_bos = bos is not None and pattern != "qwen2"
    eot = _optional_id(metadata, KEY_EOT, source)
    if eot is None and "<|eot_id|>" in tokens:
        eot = tokens.index("<|eot_id|>")
    template = metadata.get(KEY_CHAT_TEMPLATE)
    return VocabSpec(
        source=source, tokens=tokens, token_types=types, merges=merges,
        pattern=pattern, bos_id=bos,
        eos_id=_optional_id(metadata, KEY_EOS, source), eot_id=eot,
        eom_id=_optional_id(metadata, KEY_EOM, source), add_bos=add_bos,
        chat_template=template if isinstance(template, str) else None,
    )


def _split_merges(merges: Sequence[str], source: str) -> list[tuple[str, str]]:
    """"left right" strings -> (left, right) pairs, split at the first space after the first char
    (as llama.cpp does: a token may itself start with a space in a non-byte-level vocabulary)."""
    pairs = [m.partition(" ")[::2] for m in merges]  # (left, right); fast path
    if all(map(itemgetter(0), pairs)) and all(map(itemgetter(1), pairs)):
        return pairs
    out = []
    for m in merges:
        cut = m.find(" ", 1)
        if cut < 0:
            raise TokenizerError(f"{source}: {KEY_MERGES} entry {m!r} is not a 'left right' pair")
        out.append((m[:cut], m[cut + 1:]))
    return out


def _build_hf(spec: VocabSpec) -> tokenizers.Tokenizer:
    """Byte-level BPE fast tokenizer with every token at its GGUF id.

    Special tokens are in the BPE vocabulary (that is how ``tokenizers`` gives an added token a fixed
    id) and registered as added tokens; ``encode_special_tokens`` is set so their text is encoded as
    plain text. CONTROL -> special added token, USER_DEFINED -> normal added token (always matched,
    as in llama.cpp). Caveat shared with llama.cpp: a control token whose text survives
    pre-tokenization as one piece would be found by the whole-piece vocabulary lookup; "<|...|>"
    names never do (the regexes split "<|", letters and "|>").
    """
    vocab = {text: i for i, text in enumerate(spec.tokens)}
    merges = _split_merges(spec.merges, spec.source)
    try:
        # qwen2: merges all the way, as the Qwen2 tokenizer.json (ignore_merges false) and llama.cpp do
        if spec.pattern == "spm-bpe":           # transformers' GemmaTokenizer model: byte fallback, no ignore_merges
            bpe = models.BPE(vocab, merges, byte_fallback=True, fuse_unk=True,
                             unk_token="<unk>" if "<unk>" in vocab else None)
        else:
            bpe = models.BPE(vocab, merges, ignore_merges=spec.pattern != "qwen2")
    except Exception as exc:  # tokenizers raises plain Exception for unknown merge parts
        raise TokenizerError(f"{spec.source}: cannot build BPE from {KEY_TOKENS}/{KEY_MERGES}: {exc}") from exc
    hf = tokenizers.Tokenizer(bpe)
    if spec.pattern == "llama3":
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif spec.pattern == "spm-bpe":
        # transformers' GemmaTokenizer: spaces -> U+2581, BPE over the whole text (its pre-tokenizer splits on " ",
        # which the normalizer has already replaced)
        hf.normalizer = normalizers.Replace(" ", "\u2581")
        hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    elif spec.pattern == "qwen2":
        # Qwen2's tokenizer.json NFC-normalizes first; llama.cpp's test cases (made with that tokenizer) agree
        hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if spec.pattern != "spm-bpe":
        hf.decoder = decoders.ByteLevel()
    types = spec.token_types
    hf.add_special_tokens([AddedToken(spec.tokens[i], special=True, normalized=False)
                           for i in np.flatnonzero(types == TOKEN_CONTROL)])
    hf.add_tokens([AddedToken(spec.tokens[i], special=False, normalized=False)
                   for i in np.flatnonzero(types == TOKEN_USER_DEFINED)])
    hf.encode_special_tokens = True
    return hf


def _token_bytes_table(spec: VocabSpec) -> tuple[bytes, array]:
    """Raw bytes for every id (byte-level decoding for normal tokens, UTF-8 text for added ones), as one blob
    and offsets [n_vocab + 1] (an int64 ``array``: indexing gives Python ints, fast in the decode loop): token i
    is ``blob[offsets[i]:offsets[i + 1]]``. 128k separate bytes objects (and the token strings they came from)
    took ~18 MB of Python heap for LLaMA-3; the blob and offsets take 1.8 MB."""
    types = spec.token_types
    literal = (types == TOKEN_CONTROL) | (types == TOKEN_USER_DEFINED)
    if spec.pattern == "spm-bpe":               # SentencePiece pieces: U+2581 is a space, <0xXX> one byte
        parts = [t.encode("utf-8") if literal[i] else _spm_piece_bytes(t) for i, t in enumerate(spec.tokens)]
    else:
        parts = [t.encode("utf-8") if literal[i] else _normal_token_bytes(t) for i, t in enumerate(spec.tokens)]
    return b"".join(parts), array("q", accumulate((len(b) for b in parts), initial=0))


def bos_prefix(bos_id: int | None, add_bos: bool, source: str) -> list[int]:
    """The ids an encoding starts with: [BOS] when asked for (an error naming ``source`` if there is none)."""
    if not add_bos:
        return []
    if bos_id is None:
        raise TokenizerError(f"{source}: add_bos requested but the vocabulary has no BOS token")
    return [bos_id]


def check_token_id(token_id: int, vocab_size: int) -> int:
    """``token_id`` as an int, or TokenizerError when it is outside the vocabulary."""
    i = int(token_id)
    if not 0 <= i < vocab_size:
        raise TokenizerError(f"token id {i} out of range [0, {vocab_size})")
    return i


class IncrementalDecoder:
    """Turns a stream of token ids into text without ever splitting a UTF-8 character.

    ``"".join(push(t) for t in ids) + flush() == tokenizer.decode(ids)`` for any ids: incomplete
    byte sequences are held back until completed; invalid ones become U+FFFD as in ``decode``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        tok = self._tokenizer
        if self._skip_special and tok.is_control(token_id):
            return ""
        return self._utf8.decode(tok.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: dangling bytes of an unfinished character become U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class Tokenizer:
    """A GGUF byte-level BPE vocabulary: encode, decode, incremental decode and the chat format.

    Build with ``load_tokenizer(path)`` or ``tokenizer_from_metadata(metadata)``; a Hugging Face tokenizer.json with
    ``tokenizer_from_hf(directory)`` (``hf``: the fast tokenizer read from the file instead of one built from the
    spec's vocabulary and merges).
    """

    hf: tokenizers.Tokenizer
    source: str
    pattern: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eog_ids: frozenset[int]
    add_bos: bool
    chat_template: str | None

    def __init__(self, spec: VocabSpec, hf: tokenizers.Tokenizer | None = None):
        self.hf = _build_hf(spec) if hf is None else hf
        # the BPE model holds the merges and token strings now, the blob below the raw bytes: the spec's
        # 128k token strings and 280k merges (LLaMA-3) are not kept
        self.source = spec.source
        self.pattern = spec.pattern              # the pre-tokenizer regex: "llama3" or "gpt2"
        self.vocab_size = len(spec.tokens)
        self.bos_id, self.eos_id, self.eot_id = spec.bos_id, spec.eos_id, spec.eot_id
        self.add_bos = spec.add_bos
        self.chat_template = spec.chat_template
        self.eog_ids = self._end_of_generation_ids(spec)
        self._blob, self._offsets = _token_bytes_table(spec)
        self._control = spec.token_types == TOKEN_CONTROL  # (n_vocab,) bool
        specials = sorted({spec.tokens[i] for i in np.flatnonzero(self._control)}, key=len, reverse=True)
        # Longest first so "<|reserved_special_token_10|>" wins over a shorter prefix.
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._special_ids = {spec.tokens[i]: int(i) for i in np.flatnonzero(self._control)}

    @staticmethod
    def _end_of_generation_ids(spec: VocabSpec) -> frozenset[int]:
        ids = {i for i in (spec.eos_id, spec.eot_id, spec.eom_id, *spec.extra_eog_ids) if i is not None}
        ids.update(i for i, t in enumerate(spec.tokens) if t in _EOG_TEXTS)
        return frozenset(ids)

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, *, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS unless ``add_bos``).

        Special-token text such as "<|eot_id|>" is encoded as ordinary text unless
        ``parse_special=True``, in which case it becomes the control token.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._bos_prefix(add_bos)
        if parse_special and self._special_re is not None:
            pos = 0
            for m in self._special_re.finditer(text):
                ids += self._encode_plain(text[pos:m.start()])
                ids.append(self._special_ids[m.group()])
                pos = m.end()
            text = text[pos:]
        ids += self._encode_plain(text)
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """``encode`` for many texts at once (``tokenizers`` runs them on all cores); specials as text."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        prefix = self._bos_prefix(add_bos)
        try:
            encodings = self.hf.encode_batch(list(texts), add_special_tokens=False)
        except Exception as exc:
            bad = next((i for i, t in enumerate(texts) if _SURROGATE.search(t)), None)
            raise _unencodable(texts[bad] if bad is not None else "", exc,
                               field=f"texts[{bad}]" if bad is not None else "texts") from exc
        return [prefix + e.ids for e in encodings]

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        except Exception as exc:
            raise _unencodable(text, exc) from exc

    def _bos_prefix(self, add_bos: bool) -> list[int]:
        return bos_prefix(self.bos_id, add_bos, self.source)

    # -- decoding -------------------------------------------------------------------------------
    def _check_id(self, token_id: int) -> int:
        return check_token_id(token_id, self.vocab_size)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token; a special token gives its text in UTF-8."""
        i = self._check_id(token_id)
        return self._blob[self._offsets[i]:self._offsets[i + 1]]

    def token_text(self, token_id: int) -> str:
        """``token_bytes`` as text (a special token's name, e.g. "<|eot_id|>"); invalid UTF-8 becomes U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def vocab_bytes(self) -> list[bytes]:
        """Raw bytes of every token, indexed by id (e.g. for grammar-constrained sampling)."""
        blob, ends = self._blob, self._offsets
        return [blob[a:b] for a, b in zip(ends[:-1], ends[1:])]

    def control_text_in(self, text: str) -> str | None:
        """The first control-token text (e.g. "<|eot_id|>") found in ``text``, else None."""
        m = self._special_re.search(text) if self._special_re is not None else None
        return None if m is None else m.group()

    def is_control(self, token_id: int) -> bool:
        """True for CONTROL tokens (BOS, EOS, <|eot_id|>, reserved specials)."""
        return bool(self._control[self._check_id(token_id)])

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD. ``decode(encode(s)) == s`` for any valid str
        (a lone surrogate is not valid Unicode; ``encode`` rejects it with ``InputError``)."""
        checked = [self._check_id(i) for i in ids]
        if skip_special:
            checked = [i for i in checked if not self._control[i]]
        blob, off = self._blob, self._offsets
        return b"".join(blob[off[i]:off[i + 1]] for i in checked).decode("utf-8", errors="replace")

    def incremental_decoder(self, skip_special: bool = False) -> IncrementalDecoder:
        """A fresh streaming decoder (one per sequence)."""
        return IncrementalDecoder(self, skip_special=skip_special)

    # -- chat -----------------------------------------------------------------------------------
    def _turn_end_id(self) -> int:
        end = self.eot_id if self.eot_id is not None else self.eos_id
        if end is None:
            raise TokenizerError(f"{self.source}: vocabulary has neither an EOT nor an EOS token")
        return end

    @functools.cached_property
    def chat_format(self) -> str:
        """"bitnet" (our rendering below) or "jinja" (the vocabulary's own template, rendered by
        ``chat_template.render``): a template counts as the BitNet one when it carries bitnet.cpp's "BITNET"
        marker or renders a probe chat exactly as ours does (see ``chat_template.is_bitnet_format``)."""
        from . import chat_template

        if self.chat_template is None or chat_template.is_bitnet_format(self):
            return "bitnet"
        return "jinja"

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids in the BitNet b1.58 2B4T chat format (Microsoft ``gpu/tokenizer.py::ChatFormat``), or in the
        vocabulary's own Jinja template when that is a different one (``chat_format``; ``chat_template.encode``).

        ``[BOS if add_bos] + Σ(encode(f"{Role}: ") + encode(content.strip()) + [eot])
        + (encode("Assistant: ") if add_generation_prompt)``, where Role is System/User/Assistant.
        Header and content are encoded separately, as the reference does (token boundaries differ
        slightly from encoding the joined string). The turn terminator is ``eot_id`` (<|eot_id|>);
        a vocabulary without one uses ``eos_id``. The official GGUF's ``tokenizer.chat_template``
        ("Human: ... BITNETAssistant:") is not rendered: it disagrees with the HF and GPU references, and
        bitnet.cpp does not render it either. Raises ``InputError`` naming the bad field.
        """
        turns = _validate_messages(messages)
        if self.chat_format == "jinja":
            from . import chat_template

            return chat_template.encode(self, turns, add_generation_prompt)
        end = self._turn_end_id()
        ids = self._bos_prefix(self.add_bos)
        for role, content in turns:
            ids += self._encode_plain(f"{CHAT_ROLES[role]}: ")
            ids += self._encode_plain(content.strip())
            ids.append(end)
        if add_generation_prompt:
            ids += self._encode_plain(f"{CHAT_ROLES['assistant']}: ")
        return ids

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt of ``apply_chat_template`` as text (BOS and terminator shown as their token text)."""
        turns = _validate_messages(messages)
        if self.chat_format == "jinja":
            from . import chat_template

            return chat_template.render_with_bos(self, turns, add_generation_prompt)
        return self._render_bitnet(turns, add_generation_prompt)

    def _render_bitnet(self, turns: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
        end = self.token_text(self._turn_end_id())
        parts = [self.token_text(self.bos_id)] if self.add_bos else []
        parts += [f"{CHAT_ROLES[role]}: {content.strip()}{end}" for role, content in turns]
        if add_generation_prompt:
            parts.append(f"{CHAT_ROLES['assistant']}: ")
        return "".join(parts)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unencodable(text: str, exc: Exception, field: str = "text") -> InputError:
    """The error for text that ``tokenizers`` refused: in practice a lone surrogate (not valid Unicode)."""
    m = _SURROGATE.search(text)
    if m is not None:
        return InputError(f"{field} contains a lone surrogate {m.group()!r} at index {m.start()}; "
                          "it is not valid Unicode and cannot be UTF-8 encoded", field=field)
    return InputError(f"{field} cannot be tokenized: {exc}", field=field)


def _validate_messages(messages: Any) -> list[tuple[str, str]]:
    """Check a chat: a non-empty list of {"role": system|user|assistant, "content": str} dicts."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise InputError("messages must be a non-empty list of {role, content} dicts", field="messages")
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise InputError(f"messages[{i}] must be a dict, got {type(msg).__name__}", field=f"messages[{i}]")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise InputError(f"messages[{i}].role must be one of {'/'.join(CHAT_ROLES)}, got {role!r}",
                             field=f"messages[{i}].role")
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content must be a string, got {type(content).__name__}",
                             field=f"messages[{i}].content")
        turns.append((role, content))
    return turns


def tokenizer_from_metadata(metadata: Mapping[str, Any], source: str = "<metadata>") -> Tokenizer:
    """Build the tokenizer from a GGUF metadata dict (``GGUFFile.metadata``); ``source`` names it in errors.
    A SentencePiece vocabulary (``tokenizer.ggml.model = "llama"``) gives a ``spm_tokenizer.SpmTokenizer`` (the
    same interface)."""
    if metadata.get(KEY_MODEL) in SPM_MODELS:
        from .spm_tokenizer import SpmTokenizer

        return SpmTokenizer(metadata, source)
    return Tokenizer(read_vocab_spec(metadata, source))


def tokenizer_from_hf(directory: str | PathLike, n_vocab: int | None = None) -> Tokenizer:
    """Build the tokenizer of a Hugging Face checkpoint directory (tokenizer.json, tokenizer_config.json,
    generation_config.json; see ``hf_tokenizer``), padded to ``n_vocab`` ids (the model's vocabulary)."""
    from .hf_tokenizer import read_hf_tokenizer

    spec, hf = read_hf_tokenizer(directory, n_vocab)
    return Tokenizer(spec, hf)


def load_tokenizer(gguf_path: str | PathLike) -> Tokenizer:
    """Read a GGUF file's tokenizer metadata and build the tokenizer (weights are not touched)."""
    from bitnet_batch.model.gguf import GGUFFile  # local: no import cycle with the model package

    return tokenizer_from_metadata(GGUFFile(gguf_path).metadata, source=str(gguf_path))
