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
from dataclasses import dataclass, fields as dataclass_fields
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from bitnet_batch.errors import ConfigError, InputError
from bitnet_batch.sampling.params import SamplingParams

# Per-item parameters copied raw into Request.overrides (validated later, by SamplingParams and the constraint
# builders): every sampling parameter, and the structured-output fields.
OVERRIDE_KEYS = tuple(f.name for f in dataclass_fields(SamplingParams)) + ("response_format", "regex", "choice")
# OpenAI body keys that map 1:1 onto our override names (the rest are handled in _openai_overrides).
_OPENAI_SAME_KEYS = tuple(k for k in OVERRIDE_KEYS if k not in ("max_tokens", "logprobs"))
_OPENAI_URLS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}

FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
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

Item = TypeVar("Item")
# parse(record, index, id, location) -> the caller's item; raises InputError (with .field) for a bad record
RecordParser = Callable[[dict, int, "str | int", str], Item]


@dataclass(frozen=True)
class RecordSpec:
    """How a job turns one input record (a JSON object) into its item: ``parse`` after the shared checks, the
    id field, and whether OpenAI batch lines take their id from ``custom_id``."""
    parse: RecordParser
    id_field: str = "id"
    openai_ids: bool = False


def read_requests(paths: str | Path | list, *, prompt_field: str = "prompt", id_field: str = "id",
                  messages_field: str = "messages", fmt: str | None = None) -> Iterator[Request | BadRecord]:
    """Stream every record of ``paths`` (one file or a list, read in order) as Request or BadRecord.

    All files are checked (exist, readable, known format, Parquet footer readable) before anything is
    yielded, so a typo in the third file fails at once, not after hours of work on the first two.
    """
    return read_items(paths, request_spec(prompt_field=prompt_field, id_field=id_field,
                                          messages_field=messages_field), fmt=fmt)


def request_spec(*, prompt_field: str = "prompt", id_field: str = "id", messages_field: str = "messages"
                 ) -> RecordSpec:
    """Records -> ``Request``: our own shape (prompt or messages, sampling overrides) or OpenAI batch lines."""
    names = _FieldNames(prompt=prompt_field, id=id_field, messages=messages_field)

    def parse(record: dict, index: int, record_id, location: str) -> Request:
        if _is_openai(record):
            prompt, messages, overrides = _parse_openai(record)
        else:
            prompt, messages = _read_prompt(record, names)
            overrides = own_overrides(record)
        return Request(index=index, id=record_id, prompt=prompt, messages=messages, overrides=overrides,
                       location=location, fields=record)

    return RecordSpec(parse, id_field=id_field, openai_ids=True)


def read_items(paths: str | Path | list, spec: RecordSpec, *, fmt: str | None = None) -> Iterator[Item | BadRecord]:
    """The reading every job shares: stream the records of ``paths`` (checked up front, as in
    ``read_requests``) through ``parse_record`` with one ``IdRegistry`` for all files."""
    return _iter_items(check_inputs(paths, fmt), spec)


def check_inputs(paths: str | Path | list, fmt: str | None = None) -> list[tuple[Path, str]]:
    """Every input's format (``resolve_format``) and readability (``check_readable``), checked before a job
    touches its output or loads its model: a mistyped path stops it at once, with nothing to clean up.
    Returns [(path, format)]."""
    files = [(path, resolve_format(path, fmt)) for path in _as_path_list(paths)]
    for path, file_fmt in files:
        check_readable(path, file_fmt)
    return files


def parse_record(raw, index: int, where: str, spec: RecordSpec, ids: IdRegistry, file_no: int,
                 pos: int):
    """One raw record (JSONL line bytes, or a Parquet row dict with nulls dropped) at ``where`` ("file:line")
    -> ``spec.parse``'s item or a ``BadRecord``.

    Shared checks: JSON decoding, "must be an object", the id (``spec.id_field``; with ``spec.openai_ids`` an
    OpenAI batch line's ``custom_id``; absent -> ``row-{index}``), unique across the job (``ids``), and every
    ``InputError`` (from here or from ``spec.parse``) turned into a ``BadRecord`` with its location and a stable
    stand-in id when the record's own id is unusable."""
    record_id = None
    try:
        record = _decode_json_line(raw, first=(pos == 1)) if isinstance(raw, bytes) else raw
        if not isinstance(record, dict):
            hint = "; a .json input must hold one JSON object per line" if isinstance(record, list) else ""
            raise InputError(f"record must be a JSON object, got {type_name(record)}{hint}")
        id_key = "custom_id" if spec.openai_ids and _is_openai(record) else spec.id_field
        record_id = _read_id(record, id_key, index)
        first_use = ids.claim(record_id, file_no, pos)
        if first_use is not None:
            dup, record_id = record_id, None
            raise InputError(f"field {id_key!r}: duplicate value {dup!r} (first used at {first_use})", field=id_key)
        return spec.parse(record, index, record_id, where)
    except InputError as e:
        error = InputError(e.args[0], location=where, field=e.field)
        if record_id is None:
            record_id = ids.fallback(index, file_no, pos)
        return BadRecord(index=index, id=record_id, location=where, error=error)


def own_overrides(record: dict) -> dict:
    """The per-item sampling parameters of one of our own records (raw; None values dropped)."""
    overrides = {k: record[k] for k in OVERRIDE_KEYS if record.get(k) is not None}
    if isinstance(overrides.get("stop"), str):
        overrides["stop"] = [overrides["stop"]]
    return overrides


def count_records(paths: str | Path | list, fmt: str | None = None) -> int | None:
    """Number of records ``read_requests`` will yield (good + bad), for progress bars.

    Parquet: from the footer metadata. JSONL: non-blank lines, by a byte scan (no JSON parsing).
    None when unknown (an input that is not a regular file, e.g. a pipe, which must not be read twice).
    """
    total = 0
    for path, file_fmt in check_inputs(paths, fmt):
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


def resolve_format(path: Path, fmt: str | None, *, formats: tuple = FORMATS, what: str = "input") -> str:
    """``fmt`` when given (checked against ``formats``), else the format ``path``'s extension names (inputs and
    outputs share the extension table; ``what`` names the side in errors)."""
    if fmt is not None:
        if fmt not in formats:
            raise ConfigError(f"{what} format must be one of {', '.join(formats)}, got {fmt!r}")
        return fmt
    found = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if found is None:
        raise ConfigError(f"{path}: unknown {what} extension {path.suffix!r}; use one of "
                          f"{', '.join(sorted(FORMAT_BY_SUFFIX))} or give the format ({', '.join(formats)})")
    return found


def check_readable(path: Path, fmt: str) -> None:
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
                    yield row, drop_nulls(record)
                    row += 1
    except (OSError, ValueError) as e:  # ArrowInvalid derives from ValueError; IO errors from OSError
        raise ConfigError(f"{path}: corrupt Parquet data near row {row} ({e})") from e


def drop_nulls(record: dict) -> dict:
    """Parquet null cell -> absent key, also inside list-of-struct cells such as chat messages, where Arrow
    fills keys that only some messages have (e.g. ``name``) with nulls."""
    out = {k: v for k, v in record.items() if v is not None}
    for key, value in out.items():
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            out[key] = [{k: v for k, v in m.items() if v is not None} for m in value]
    return out


# ------------------------------------------------------------------------------------------ record parsing

class IdRegistry:
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
        return location(path, fmt, packed & ((1 << _ROW_BITS) - 1))


def location(path: Path, fmt: str, pos: int) -> str:
    """Where record ``pos`` of an input is: file:line (JSONL), file:row N (Parquet), records[i] (a list in memory,
    ``bitnet_batch.api``)."""
    if fmt == "records":
        return f"{path}[{pos}]"
    return f"{path}:row {pos}" if fmt == "parquet" else f"{path}:{pos}"


def _iter_items(files: list[tuple[Path, str]], spec: RecordSpec) -> Iterator:
    ids = IdRegistry(files)
    index = 0
    for file_no, (path, fmt) in enumerate(files):
        rows = _parquet_rows(path) if fmt == "parquet" else _jsonl_lines(path)
        for pos, raw in rows:
            yield parse_record(raw, index, location(path, fmt, pos), spec, ids, file_no, pos)
            index += 1


def _is_openai(record: dict) -> bool:
    return "custom_id" in record and "body" in record


def _decode_json_line(raw: bytes, *, first: bool) -> Any:
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"line is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        # without its line ending: a line cut short would otherwise be reported at column 1 of the next line
        return json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        at = "" if e.msg.endswith(" at") else " at"      # "Unterminated string starting at"
        raise InputError(f"invalid JSON: {e.msg}{at} column {e.colno}") from None


def _read_id(record: dict, key: str, index: int) -> str | int:
    if key not in record:
        return f"row-{index}"
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"field {key!r} must be a string or an integer, got {type_name(value)} "
                         f"({short(value)})", field=key)
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
                         f"{names.messages!r}{other_fields(record, '--prompt-field', names.id)}", field=names.prompt)
    prompt = record[names.prompt]
    if not isinstance(prompt, str):
        raise InputError(f"field {names.prompt!r} must be a string, got {type_name(prompt)} ({short(prompt)})",
                         field=names.prompt)
    return prompt, None


def _check_messages(messages, field: str) -> list[dict]:
    shape = "a non-empty list of {role: str, content: str} objects"
    if not isinstance(messages, list) or not messages:
        raise InputError(f"field {field!r} must be {shape}, got {short(messages)}", field=field)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"field {field!r} must be {shape}; item {i} is {type_name(message)}", field=field)
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InputError(f"field {field!r} must be {shape}; item {i}: {key!r} must be a string, got "
                                 f"{type_name(message.get(key))} ({short(message.get(key))})", field=field)
    return messages


# ------------------------------------------------------------------------------------ OpenAI Batch API lines

def _parse_openai(record: dict) -> tuple[str | None, list[dict] | None, dict]:
    body = record["body"]
    if not isinstance(body, dict):
        raise InputError(f"field 'body' must be a JSON object, got {type_name(body)}", field="body")
    method = record.get("method", "POST")
    if method != "POST":
        raise InputError(f"field 'method' must be 'POST', got {short(method)}", field="method")
    wanted = _openai_prompt_key(record.get("url"), body)
    if wanted == "messages":
        return None, _check_messages(body.get("messages"), "body.messages"), _openai_overrides(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise InputError(f"field 'body.prompt' must be a string, got {type_name(prompt)} ({short(prompt)})",
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
        raise InputError(f"field 'url' must be one of {', '.join(_OPENAI_URLS)}, got {short(url)}", field="url")
    return _OPENAI_URLS[url]


def _openai_overrides(body: dict) -> dict:
    overrides = {k: body[k] for k in _OPENAI_SAME_KEYS if body.get(k) is not None}
    if isinstance(overrides.get("stop"), str):
        overrides["stop"] = [overrides["stop"]]
    max_tokens, max_completion = body.get("max_tokens"), body.get("max_completion_tokens")
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise InputError(f"body gives max_tokens={short(max_tokens)} and max_completion_tokens="
                         f"{short(max_completion)}; give one", field="body.max_completion_tokens")
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

def other_fields(record: dict, option: str, id_field: str | None = None) -> str:
    """A hint for a record that lacks the field a job reads: its string fields, which ``option`` can name
    (" (its string fields: 'body', 'title'; see --text-field)"), or "" when it has none."""
    names = [k for k, v in record.items() if isinstance(v, str) and v and k != id_field]
    if not names:
        return ""
    listed = ", ".join(repr(k) for k in names[:5]) + (", ..." if len(names) > 5 else "")
    return f" (its string fields: {listed}; see {option})"


def type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
