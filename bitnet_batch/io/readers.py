"""Job input: JSONL / Parquet rows -> ``Request`` (or ``BadRecord``), streamed, with ``file:line`` in every error.

Two record shapes are accepted, per line / row:

* our own: ``{"id": ..., "prompt": "..." | "messages": [...], "temperature": ..., ...}``; the prompt, id and
  messages column names can be remapped (``--prompt-field question``);
* OpenAI Batch API input lines: ``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions",
  "body": {...}}``, detected by ``custom_id`` + ``body``; body parameters are mapped to our names.

Fatal problems (missing file, unknown format, corrupt Parquet) raise ``ConfigError``; a bad record never
stops reading: it is yielded as a ``BadRecord`` carrying an ``InputError`` and the runner turns it into an
error output row.

Parquet has no "absent" cell, only null, so in Parquet rows a null cell means "field absent" (a table that
mixes ``prompt`` and ``messages`` rows has nulls in both columns). In JSONL an explicit ``"id": null`` is a
wrong id type. A null sampling override (``"temperature": null``) means "not set" in both formats.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bitnet_batch.errors import ConfigError, InputError

# Per-item parameters copied raw into Request.overrides (validated later by the runner).
OVERRIDE_KEYS = (
    "max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "stop", "logprobs", "n", "response_format", "regex", "choice",
)
# OpenAI body keys that map 1:1 onto our override names (the rest are handled in _openai_overrides).
_OPENAI_SAME_KEYS = tuple(k for k in OVERRIDE_KEYS if k not in ("max_tokens", "logprobs"))
_OPENAI_URLS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}

_FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
FORMATS = ("jsonl", "parquet")
_PARQUET_BATCH_ROWS = 1024  # rows converted to Python dicts at a time, inside one row group
_ROW_BITS = 40              # packing of (file ordinal, line/row) into one int for duplicate-id bookkeeping


@dataclass(frozen=True)
class Request:
    """One good input item."""

    index: int                      # global 0-based input row across all input files, in read order
    id: str | int                   # from the id field; when absent: f"row-{index}" (stable)
    prompt: str | None              # raw text prompt, or
    messages: list[dict] | None     # chat messages [{"role": str, "content": str}, ...]
    overrides: dict                 # per-item sampling parameters found in the record, raw (None dropped)
    location: str                   # "file.jsonl:17" (1-based line) or "file.parquet:row 17" (0-based row)
    fields: dict                    # the whole original record (for prompt templates)

    def __post_init__(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(f"{self.location}: a Request needs exactly one of prompt and messages")
        if self.index < 0:
            raise ValueError(f"{self.location}: index must be >= 0, got {self.index}")


@dataclass(frozen=True)
class BadRecord:
    """One input item that could not be turned into a Request; ``error.field`` names the field (None when
    the whole line is unusable: invalid JSON, not an object).

    ``id`` is the id the item's error record must carry, never None: the record's own id when it is usable,
    else (no id, invalid JSON, bad id type, duplicate id) a fallback ``row-{index}`` that is reserved like
    any other id, so it is unique in the job and the same on every run (resume skips it by id). If an
    explicit id already took ``row-{index}``, the fallback is ``row-{index}-1`` (``-2``, ...)."""

    index: int
    id: str | int
    location: str
    error: InputError


# ---------------------------------------------------------------------------------------------- public API

def read_requests(paths: str | Path | list, *, prompt_field: str = "prompt", id_field: str = "id",
                  messages_field: str = "messages", fmt: str | None = None) -> Iterator[Request | BadRecord]:
    """Stream every record of ``paths`` (one file or a list, read in order) as Request or BadRecord.

    All files are checked (exist, readable, known format, Parquet footer readable) before anything is
    yielded, so a typo in the third file fails at once, not after hours of work on the first two.
    """
    files = [(path, _resolve_format(path, fmt)) for path in _as_path_list(paths)]
    for path, file_fmt in files:
        _check_readable(path, file_fmt)
    names = _FieldNames(prompt=prompt_field, id=id_field, messages=messages_field)
    return _iter_requests(files, names)


def count_records(paths: str | Path | list, fmt: str | None = None) -> int | None:
    """Number of records ``read_requests`` will yield (good + bad), for progress bars.

    Parquet: from the footer metadata. JSONL: non-blank lines, by a byte scan (no JSON parsing).
    None when unknown (an input that is not a regular file, e.g. a pipe, which must not be read twice).
    """
    total = 0
    for path in _as_path_list(paths):
        file_fmt = _resolve_format(path, fmt)
        _check_readable(path, file_fmt)
        if not path.is_file():
            return None
        if file_fmt == "parquet":
            total += _open_parquet(path).metadata.num_rows
        else:
            with open(path, "rb") as f:
                total += sum(1 for raw in f if raw.strip())
    return total


# ------------------------------------------------------------------------------------------ file handling

@dataclass(frozen=True)
class _FieldNames:
    prompt: str
    id: str
    messages: str


def _as_path_list(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    out = [Path(p) for p in paths]
    if not out:
        raise ConfigError("no input files given")
    return out


def _resolve_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ConfigError(f"input format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    found = _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if found is None:
        raise ConfigError(f"{path}: unknown input extension {path.suffix!r}; use one of "
                          f"{', '.join(sorted(_FORMAT_BY_SUFFIX))} or give the format explicitly")
    return found


def _check_readable(path: Path, fmt: str) -> None:
    if not path.exists():
        raise ConfigError(f"{path}: input file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: input is a directory, expected a {fmt} file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(f"{path}: input file cannot be read ({e.strerror or e})") from e
    if fmt == "parquet":
        _open_parquet(path)


def _open_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for torn or foreign files
        raise ConfigError(f"{path}: not a readable Parquet file ({e})") from e


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line; binary so only b"\\n" splits lines."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield lineno, raw


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(0-based row, record) streamed row group by row group, ``_PARQUET_BATCH_ROWS`` dicts at a time."""
    pf = _open_parquet(path)
    row = 0
    try:
        for group in range(pf.num_row_groups):
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[group], use_threads=False):
                for record in batch.to_pylist():
                    yield row, _drop_nulls(record)
                    row += 1
    except (OSError, ValueError) as e:  # ArrowInvalid derives from ValueError; IO errors from OSError
        raise ConfigError(f"{path}: corrupt Parquet data near row {row} ({e})") from e


def _drop_nulls(record: dict) -> dict:
    """Parquet null cell -> absent key, also inside list-of-struct cells such as chat messages, where Arrow
    fills keys that only some messages have (e.g. ``name``) with nulls."""
    out = {k: v for k, v in record.items() if v is not None}
    for key, value in out.items():
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            out[key] = [{k: v for k, v in m.items() if v is not None} for m in value]
    return out


# ------------------------------------------------------------------------------------------ record parsing

class _Seen:
    """Ids seen so far (as str, so 1 and "1" collide: ids are strings in Parquet / OpenAI output) -> packed
    (file ordinal, line) of their first use, to name it in the duplicate message."""

    def __init__(self, files: list[tuple[Path, str]]):
        self._files = files
        self._first: dict[str, int] = {}

    def fallback(self, index: int, file_no: int, pos: int) -> str:
        """Reserve a unique stand-in id for a record whose own id is absent or unusable."""
        candidate, n = f"row-{index}", 0
        while candidate in self._first:
            n += 1
            candidate = f"row-{index}-{n}"
        self.claim(candidate, file_no, pos)
        return candidate

    def claim(self, id_value, file_no: int, pos: int) -> str | None:
        """Register ``id_value``; return the location of its first use when it is a duplicate."""
        key = str(id_value)
        packed = self._first.setdefault(key, (file_no << _ROW_BITS) | pos)
        if packed == (file_no << _ROW_BITS) | pos:
            return None
        path, fmt = self._files[packed >> _ROW_BITS]
        return _location(path, fmt, packed & ((1 << _ROW_BITS) - 1))


def _location(path: Path, fmt: str, pos: int) -> str:
    return f"{path}:row {pos}" if fmt == "parquet" else f"{path}:{pos}"


def _iter_requests(files: list[tuple[Path, str]], names: _FieldNames) -> Iterator[Request | BadRecord]:
    seen = _Seen(files)
    index = 0
    for file_no, (path, fmt) in enumerate(files):
        rows = _parquet_rows(path) if fmt == "parquet" else _jsonl_lines(path)
        for pos, raw in rows:
            location = _location(path, fmt, pos)
            yield _parse_one(raw, index, location, names, seen, file_no, pos)
            index += 1


def _parse_one(raw, index: int, location: str, names: _FieldNames, seen: _Seen, file_no: int,
               pos: int) -> Request | BadRecord:
    record_id = None
    try:
        record = _decode_json_line(raw, first=(pos == 1)) if isinstance(raw, bytes) else raw
        if not isinstance(record, dict):
            hint = "; a .json input must hold one JSON object per line" if isinstance(record, list) else ""
            raise InputError(f"record must be a JSON object, got {_type_name(record)}{hint}")
        is_openai = "custom_id" in record and "body" in record
        id_key = "custom_id" if is_openai else names.id
        record_id = _read_id(record, id_key, index)
        first_use = seen.claim(record_id, file_no, pos)
        if first_use is not None:
            dup, record_id = record_id, None
            raise InputError(f"field {id_key!r}: duplicate value {dup!r} (first used at {first_use})", field=id_key)
        if is_openai:
            prompt, messages, overrides = _parse_openai(record)
        else:
            prompt, messages = _read_prompt(record, names)
            overrides = _own_overrides(record)
    except InputError as e:
        error = InputError(e.args[0], location=location, field=e.field)
        if record_id is None:
            record_id = seen.fallback(index, file_no, pos)
        return BadRecord(index=index, id=record_id, location=location, error=error)
    return Request(index=index, id=record_id, prompt=prompt, messages=messages, overrides=overrides,
                   location=location, fields=record)


def _decode_json_line(raw: bytes, *, first: bool) -> Any:
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"line is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg} at column {e.colno}") from None


def _read_id(record: dict, key: str, index: int) -> str | int:
    if key not in record:
        return f"row-{index}"
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"field {key!r} must be a string or an integer, got {_type_name(value)} "
                         f"({_short(value)})", field=key)
    return value


def _read_prompt(record: dict, names: _FieldNames) -> tuple[str | None, list[dict] | None]:
    has_prompt, has_messages = names.prompt in record, names.messages in record
    if has_prompt and has_messages:
        raise InputError(f"record has both field {names.prompt!r} and field {names.messages!r}; give one",
                         field=names.prompt)
    if has_messages:
        return None, _check_messages(record[names.messages], names.messages)
    if not has_prompt:
        raise InputError(f"missing prompt: record has neither field {names.prompt!r} nor field "
                         f"{names.messages!r}", field=names.prompt)
    prompt = record[names.prompt]
    if not isinstance(prompt, str):
        raise InputError(f"field {names.prompt!r} must be a string, got {_type_name(prompt)} ({_short(prompt)})",
                         field=names.prompt)
    return prompt, None


def _check_messages(messages, field: str) -> list[dict]:
    shape = "a non-empty list of {role: str, content: str} objects"
    if not isinstance(messages, list) or not messages:
        raise InputError(f"field {field!r} must be {shape}, got {_short(messages)}", field=field)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"field {field!r} must be {shape}; item {i} is {_type_name(message)}", field=field)
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InputError(f"field {field!r} must be {shape}; item {i}: {key!r} must be a string, got "
                                 f"{_type_name(message.get(key))} ({_short(message.get(key))})", field=field)
    return messages


def _own_overrides(record: dict) -> dict:
    overrides = {k: record[k] for k in OVERRIDE_KEYS if record.get(k) is not None}
    if isinstance(overrides.get("stop"), str):
        overrides["stop"] = [overrides["stop"]]
    return overrides


# ------------------------------------------------------------------------------------ OpenAI Batch API lines

def _parse_openai(record: dict) -> tuple[str | None, list[dict] | None, dict]:
    body = record["body"]
    if not isinstance(body, dict):
        raise InputError(f"field 'body' must be a JSON object, got {_type_name(body)}", field="body")
    method = record.get("method", "POST")
    if method != "POST":
        raise InputError(f"field 'method' must be 'POST', got {_short(method)}", field="method")
    wanted = _openai_prompt_key(record.get("url"), body)
    if wanted == "messages":
        return None, _check_messages(body.get("messages"), "body.messages"), _openai_overrides(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise InputError(f"field 'body.prompt' must be a string, got {_type_name(prompt)} ({_short(prompt)})",
                         field="body.prompt")
    return prompt, None, _openai_overrides(body)


def _openai_prompt_key(url, body: dict) -> str:
    if url is None:  # no url: whichever of messages / prompt the body has
        if "messages" in body:
            return "messages"
        if "prompt" in body:
            return "prompt"
        raise InputError("missing prompt: body has neither 'messages' nor 'prompt'", field="body.messages")
    if url not in _OPENAI_URLS:
        raise InputError(f"field 'url' must be one of {', '.join(_OPENAI_URLS)}, got {_short(url)}", field="url")
    return _OPENAI_URLS[url]


def _openai_overrides(body: dict) -> dict:
    overrides = {k: body[k] for k in _OPENAI_SAME_KEYS if body.get(k) is not None}
    if isinstance(overrides.get("stop"), str):
        overrides["stop"] = [overrides["stop"]]
    max_tokens, max_completion = body.get("max_tokens"), body.get("max_completion_tokens")
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise InputError(f"body gives max_tokens={_short(max_tokens)} and max_completion_tokens="
                         f"{_short(max_completion)}; give one", field="body.max_completion_tokens")
    if max_completion is not None or max_tokens is not None:
        overrides["max_tokens"] = max_completion if max_completion is not None else max_tokens
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if top is not None and logprobs is not True:
        raise InputError("body.top_logprobs needs body.logprobs: true", field="body.top_logprobs")
    if logprobs is True:  # chat API: logprobs: true + top_logprobs: n -> our logprobs n
        overrides["logprobs"] = 0 if top is None else top
    elif logprobs is not None and logprobs is not False:  # legacy completions API: already the count
        overrides["logprobs"] = logprobs
    return overrides


# -------------------------------------------------------------------------------------------------- helpers

def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
