"""SentencePiece vocabularies from GGUF (``tokenizer.ggml.model = "llama"``: tokens with scores and byte-fallback
tokens ``<0xXX>``), tokenized exactly as llama.cpp's ``llm_tokenizer_spm`` does (``src/llama-vocab.cpp``); the same
public interface as ``tokenizer.Tokenizer`` (``tokenizer_from_metadata`` picks this class for such files).

Algorithm (llama.cpp): the text gets a leading space when ``tokenizer.ggml.add_space_prefix`` (default true) and
the previous fragment was a special token or the start, spaces become U+2581, then the characters are merged
pairwise, always the adjacent pair whose concatenation is the vocabulary token with the highest score (ties: the
leftmost pair), until no adjacent pair forms a token. A symbol that is not a token is emitted as its UTF-8 bytes
(``<0xXX>`` tokens). USER_DEFINED tokens are always matched in the text; CONTROL tokens only with
``parse_special=True`` (as ``Tokenizer``: user data cannot inject them).

Decoding: U+2581 -> space, byte tokens -> their byte, a special token's text as is; the space the prefix rule added
before the first token is dropped (llama.cpp ``detokenize`` with ``add_space_prefix``).
"""
from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import InputError, TokenizerError
from .tokenizer import (KEY_ADD_BOS, KEY_BOS, KEY_CHAT_TEMPLATE, KEY_EOS, KEY_EOT, KEY_MODEL, KEY_TOKEN_TYPE,
                        KEY_TOKENS, TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED, IncrementalDecoder,
                        _optional_id, _require_str_list, _validate_messages, bos_prefix, check_token_id)

KEY_SCORES = "tokenizer.ggml.scores"
KEY_ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
KEY_UNK = "tokenizer.ggml.unknown_token_id"
SPACE = "\u2581"                      # SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SURROGATE = re.compile("[\ud800-\udfff]")


class SpmTokenizer:
    """A GGUF SentencePiece vocabulary: encode / decode like llama.cpp, ``Tokenizer``'s interface."""

    hf = None                          # no ``tokenizers`` object behind it (grammar constraints need one)
    pattern = "spm"

    def __init__(self, metadata: Mapping[str, Any], source: str = "<metadata>"):
        model = metadata.get(KEY_MODEL)
        if model != "llama":
            raise TokenizerError(f"{source}: {KEY_MODEL} is {model!r}, not a SentencePiece ('llama') vocabulary")
        tokens = _require_str_list(metadata, KEY_TOKENS, source)
        n = len(tokens)
        scores = metadata.get(KEY_SCORES)
        if scores is None:
            raise TokenizerError(f"{source}: missing GGUF metadata key {KEY_SCORES!r}; a SentencePiece vocabulary "
                                 "needs its token scores")
        scores = np.asarray(scores, np.float32).reshape(-1)
        raw_types = metadata.get(KEY_TOKEN_TYPE)
        types = (np.full(n, TOKEN_NORMAL, np.int32) if raw_types is None
                 else np.asarray(raw_types).astype(np.int32).reshape(-1))
        if scores.shape != (n,) or types.shape != (n,):
            raise TokenizerError(f"{source}: {KEY_SCORES} ({scores.shape[0]}) / {KEY_TOKEN_TYPE} ({types.shape[0]}) "
                                 f"do not match {KEY_TOKENS} ({n})")
        self.source = source
        self.vocab_size = n
        self._tokens = tokens
        self._types = types
        self._scores = scores.tolist()
        self._ids: dict[str, int] = {}
        for i, t in enumerate(tokens):
            self._ids.setdefault(t, i)         # llama.cpp: the first id of a duplicated text wins
        self._byte_ids = {}
        for i in np.flatnonzero(types == TOKEN_BYTE):
            m = _BYTE_TOKEN.fullmatch(tokens[i])
            if m:
                self._byte_ids[int(m.group(1), 16)] = int(i)
        for key, value in ((KEY_BOS, _optional_id(metadata, KEY_BOS, source)),
                           (KEY_EOS, _optional_id(metadata, KEY_EOS, source)),
                           (KEY_EOT, _optional_id(metadata, KEY_EOT, source)),
                           (KEY_UNK, _optional_id(metadata, KEY_UNK, source))):
            if value is not None and not 0 <= value < n:
                raise TokenizerError(f"{source}: {key} must be in [0, {n}), got {value}")
        self.bos_id = _optional_id(metadata, KEY_BOS, source)
        self.eos_id = _optional_id(metadata, KEY_EOS, source)
        self.eot_id = _optional_id(metadata, KEY_EOT, source)
        self.unk_id = _optional_id(metadata, KEY_UNK, source)
        add_bos = metadata.get(KEY_ADD_BOS)
        self.add_bos = bool(add_bos) if add_bos is not None else True      # llama.cpp's SPM default
        if self.add_bos and self.bos_id is None:
            raise TokenizerError(f"{source}: {KEY_ADD_BOS} is true but {KEY_BOS} is missing")
        prefix = metadata.get(KEY_ADD_SPACE_PREFIX)
        self.add_space_prefix = bool(prefix) if prefix is not None else True
        template = metadata.get(KEY_CHAT_TEMPLATE)
        self.chat_template = template if isinstance(template, str) else None
        self.eog_ids = frozenset(i for i in (self.eos_id, self.eot_id) if i is not None)
        self._control = types == TOKEN_CONTROL
        self._user = [tokens[i] for i in np.flatnonzero(types == TOKEN_USER_DEFINED)]
        controls = [tokens[i] for i in np.flatnonzero(self._control) if tokens[i]]
        self._user_re = _alternation(self._user)
        self._all_re = _alternation(self._user + controls)
        self._control_re = _alternation(controls)
        self._blob_cache: list[bytes] | None = None

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, *, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS unless ``add_bos``); CONTROL token text is plain text unless
        ``parse_special``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        m = _SURROGATE.search(text)
        if m is not None:
            raise InputError(f"text contains a lone surrogate {m.group()!r} at index {m.start()}; it is not valid "
                             "Unicode and cannot be UTF-8 encoded", field="text")
        ids = self._bos_prefix(add_bos)
        splitter = self._all_re if parse_special else self._user_re
        prev_special, pos = True, 0
        pieces = splitter.finditer(text) if splitter is not None else ()
        for m in pieces:
            if m.start() > pos:
                ids += self._encode_fragment(text[pos:m.start()], prev_special)
            ids.append(self._ids[m.group()])
            prev_special, pos = True, m.end()
        if pos < len(text):
            ids += self._encode_fragment(text[pos:], prev_special)
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        return [self.encode(t, add_bos) for t in texts]

    def _bos_prefix(self, add_bos: bool) -> list[int]:
        return bos_prefix(self.bos_id, add_bos, self.source)

    def _encode_fragment(self, text: str, prev_special: bool) -> list[int]:
        if self.add_space_prefix and prev_special:
            text = " " + text
        return self._merge(text.replace(" ", SPACE))

    def _merge(self, text: str) -> list[int]:
        """llama.cpp ``llm_tokenizer_spm_session::tokenize`` over one escaped fragment."""
        n = len(text)
        if n == 0:
            return []
        start = list(range(n))          # symbol i covers text[start[i]:start[i] + size[i]]
        size = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        ids, scores = self._ids, self._scores
        heap: list = []

        def add(left, right):
            if left < 0 or right < 0:
                return
            piece = text[start[left]:start[left] + size[left] + size[right]]
            tid = ids.get(piece)
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, len(piece)))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, length = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != length:
                continue
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        out, i = [], 0
        while i != -1:
            piece = text[start[i]:start[i] + size[i]]
            tid = ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out += self._bytes_of(piece)
            i = nxt[i]
        return out

    def _bytes_of(self, piece: str) -> list[int]:
        """Byte fallback: one ``<0xXX>`` token per UTF-8 byte (the unknown token where the vocabulary lacks one)."""
        out = []
        for b in piece.encode("utf-8"):
            tid = self._byte_ids.get(b, self.unk_id)
            if tid is None:
                raise TokenizerError(f"{self.source}: no byte token <0x{b:02X}> and no unknown token for "
                                     f"{piece!r}")
            out.append(tid)
        return out

    # -- decoding -------------------------------------------------------------------------------
    def _check_id(self, token_id: int) -> int:
        return check_token_id(token_id, self.vocab_size)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token: a byte token's byte, a normal token's text with U+2581 as space, a special
        token's text."""
        i = self._check_id(token_id)
        t = self._tokens[i]
        typ = self._types[i]
        if typ == TOKEN_BYTE:
            m = _BYTE_TOKEN.fullmatch(t)
            if m:
                return bytes([int(m.group(1), 16)])
        if typ == TOKEN_NORMAL:
            return t.replace(SPACE, " ").encode("utf-8")
        return t.encode("utf-8")

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def vocab_bytes(self) -> list[bytes]:
        if self._blob_cache is None:
            self._blob_cache = [self.token_bytes(i) for i in range(self.vocab_size)]
        return list(self._blob_cache)

    def is_control(self, token_id: int) -> bool:
        return bool(self._control[self._check_id(token_id)])

    def control_text_in(self, text: str) -> str | None:
        m = self._control_re.search(text) if self._control_re is not None else None
        return None if m is None else m.group()

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        checked = [self._check_id(i) for i in ids]
        if skip_special:
            checked = [i for i in checked if not self._control[i]]
        data = b"".join(self.token_bytes(i) for i in checked)
        text = data.decode("utf-8", errors="replace")
        first = next((i for i in checked if not self._control[i]), None)
        if self.add_space_prefix and first is not None and self._types[first] == TOKEN_NORMAL \
                and text.startswith(" ") and self._tokens[first].startswith(SPACE):
            text = text[1:]
        return text

    def incremental_decoder(self, skip_special: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special=skip_special)

    # -- chat -----------------------------------------------------------------------------------
    @property
    def chat_format(self) -> str:
        return "jinja" if self.chat_template is not None else "none"

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """The vocabulary's own Jinja template (``chat_template.encode``); a SentencePiece vocabulary has no
        BitNet chat format."""
        from . import chat_template

        turns = _validate_messages(messages)
        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: this SentencePiece vocabulary has no chat template")
        return chat_template.encode(self, turns, add_generation_prompt)

    def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        from . import chat_template

        turns = _validate_messages(messages)
        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: this SentencePiece vocabulary has no chat template")
        return chat_template.render_with_bos(self, turns, add_generation_prompt)


def _alternation(texts):
    """A regex matching any of ``texts``, longest first (None when there are none)."""
    texts = sorted({t for t in texts if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None
