"""Declarative jobs: a TOML file that names the input, a prompt template, sampling, a constraint and the output.

``bitnet-batch run pipelines/summarize.toml`` (or ``--pipeline FILE``) loads a ``Pipeline`` and turns it into
a ``JobConfig``; options given explicitly on the command line override the file. Every path in the file is
relative to the file's own directory, so a pipeline runs the same from any working directory (cron). The file
is validated on load: unknown sections or keys and bad values are errors naming the file, section and key
(``pipelines/x.toml: [sampling] temperature must be a number >= 0, got -1``). The format::

    name = "summarize"                  # optional (default: the file name)
    description = "..."                 # optional

    [input]                             # required
    path = "../examples/pipelines/articles.jsonl"   # a path or glob, or a list of them
    format = "jsonl"                    # optional: jsonl | parquet (default: by extension)
    id_field = "id"                     # optional
    fields = { body = "text" }          # optional: placeholder -> record field (dotted path: "meta.title")

    [prompt]                            # required: user (a chat turn) or text (a raw prompt)
    system = "You are ..."              # optional, with user
    user = "Summarize:\n\n{body}"       # {field} placeholders; {{ and }} are literal braces
    truncate = "left"                   # optional: cut over-long prompts instead of an error record

    [model]
    name = "microsoft/bitnet-b1.58-2B-4T-gguf"      # hub repo id, or a .gguf path
    file = "ggml-model-i2_s.gguf"       # optional: file inside the repo
    ffn_act = "relu2"                   # optional

    [sampling]                          # SamplingParams fields, plus:
    seed = 0                            # the JOB seed (request seeds derive from it, the id and the sample)
    n = 1                               # samples per input
    dedupe = false                      # drop samples whose text equals an earlier sample of the same input

    [constraint]                        # at most one key, plus json_limits
    choice = ["a", "b"]   # or regex = "...", json_schema = {...}, json_schema_file = "x.json",
                          # response_format = {type = "json_object"}
    json_limits = { string = 1000 }     # optional: digits, exponent, string, items (0: no bound), or "none"

    [output]
    path = "../out/summaries.jsonl"
    format = "jsonl"                    # optional: jsonl | parquet | openai
    ordered = true

    [engine]                            # max_batch, prefill_chunk, kv_cache_mb, kv_dtype, max_seq_len, threads,
                                        # prefix_cache (default true)

A record missing a placeholder's field becomes an error record naming ``file:line`` and the field; the job
goes on. Records may still carry per-item parameters (``max_tokens``, ``n``, ``regex``, ...).
"""
from __future__ import annotations

import difflib
import glob
import json
import os
import re
import sys
from dataclasses import dataclass, fields as dataclass_fields, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from .engine.engine import EngineConfig
from .errors import ConfigError, InputError
from .io.readers import BadRecord, RecordSpec, Request, own_overrides, read_items
from .model.hub import DEFAULT_REPO
from .jobs.run import JobConfig
from .options import ENGINE_OPTIONS, SAMPLING_OPTIONS
from .sampling.constraints import (ConstraintSpec, JsonLimits, choice_constraint, json_schema_constraint,
                                   response_format_constraint, regex_constraint)
from .sampling.params import SamplingParams

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECTIONS = ("input", "prompt", "model", "sampling", "constraint", "output", "engine")
TOP_KEYS = ("name", "description") + SECTIONS
KEYS = {
    "input": ("path", "format", "id_field", "fields"),
    "prompt": ("system", "user", "text", "truncate"),
    "model": ("name", "file", "ffn_act"),
    "sampling": tuple(sorted(SamplingParams.field_names() | {"dedupe"})),      # seed: the job seed
    "constraint": ("choice", "regex", "json_schema", "json_schema_file", "response_format", "json_limits"),
    "output": ("path", "format", "ordered"),
    "engine": ENGINE_OPTIONS,
}
INPUT_FORMATS = ("jsonl", "parquet")
OUTPUT_FORMATS = ("jsonl", "parquet", "openai")
FFN_ACTS = ("relu2", "silu")


# ------------------------------------------------------------------------------------------ the template

_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*$")
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


@dataclass(frozen=True)
class PromptTemplate:
    """How a raw input record becomes a prompt: ``user`` (a chat turn, with an optional ``system`` turn) or
    ``text`` (a raw prompt), with ``{field}`` placeholders filled from the record (``fields`` maps a
    placeholder to another record field or a dotted path into nested objects)."""

    user: str | None = None
    text: str | None = None
    system: str | None = None
    fields: tuple[tuple[str, str], ...] = ()      # (placeholder, record field path), sorted

    def __post_init__(self):
        if (self.user is None) == (self.text is None):
            raise ConfigError("[prompt] needs exactly one of 'user' (a chat message) and 'text' (a raw prompt)")
        if self.system is not None and self.text is not None:
            raise ConfigError("[prompt] system goes with 'user' (a chat); 'text' is a raw prompt")
        names = set()
        for key in ("system", "user", "text"):
            value = getattr(self, key)
            if value is not None:
                names.update(name for kind, name in _parse_template(value, key) if kind == "field")
        for placeholder, path in self.fields:
            if placeholder not in names:
                raise ConfigError(f"[input] fields maps {placeholder!r}, but no template uses {{{placeholder}}}")
            if not _FIELD_NAME.match(path):
                raise ConfigError(f"[input] fields.{placeholder} must be a field name or dotted path, got {path!r}")

    def describe(self) -> dict:
        """JSON-serialisable, for the job fingerprint."""
        return {"system": self.system, "user": self.user, "text": self.text, "fields": dict(self.fields)}

    def render(self, record: Mapping) -> tuple[str | None, list[dict] | None]:
        """(prompt, None) for a text template, (None, messages) for a chat one. Raises InputError naming the
        missing field."""
        if self.text is not None:
            return self._fill(self.text, "text", record), None
        messages = [{"role": "system", "content": self._fill(self.system, "system", record)}] if self.system else []
        messages.append({"role": "user", "content": self._fill(self.user, "user", record)})
        return None, messages

    def _fill(self, template: str, key: str, record: Mapping) -> str:
        mapping = dict(self.fields)
        out = []
        for kind, value in _parse_template(template, key):
            if kind == "text":
                out.append(value)
                continue
            path = mapping.get(value, value)
            found = _lookup(record, path)
            if found is None:
                via = "" if path == value else f" (placeholder {{{value}}})"
                raise InputError(f"prompt template [prompt] {key} needs field {path!r}{via}, which the record "
                                 f"does not have (or is null)", field=path)
            out.append(found if isinstance(found, str) else json.dumps(found, ensure_ascii=False))
        return "".join(out)

    # ------------------------------------------------------------------------------------- reading

    def requests(self, paths, *, fmt: str | None = None, id_field: str = "id") -> Iterator[Request | BadRecord]:
        """Every record of ``paths`` as a Request with its prompt rendered from this template (or a BadRecord);
        ids, duplicates, locations and per-item parameters exactly as ``io.readers.read_requests``."""
        return read_items(paths, self.record_spec(id_field), fmt=fmt)

    def record_spec(self, id_field: str = "id") -> RecordSpec:
        """Records -> ``Request`` with this template's prompt (the shared checks are ``io.readers``')."""
        def parse(record: dict, index: int, record_id, location: str) -> Request:
            prompt, messages = self.render(record)
            return Request(index=index, id=record_id, prompt=prompt, messages=messages,
                           overrides=own_overrides(record), location=location, fields=record)

        return RecordSpec(parse, id_field=id_field)


def _parse_template(template: str, key: str) -> list[tuple[str, str]]:
    """[("text", literal) | ("field", name)] of a template; raises ConfigError on a stray brace or bad name."""
    parts, pos = [], 0
    for m in _TOKEN.finditer(template):
        if m.start() > pos:
            parts.append(("text", template[pos:m.start()]))
        tok = m.group()
        if tok in ("{{", "}}"):
            parts.append(("text", tok[0]))
        elif tok in ("{", "}"):
            raise ConfigError(f"[prompt] {key}: unmatched {tok!r} at character {m.start()}; write {tok * 2} for "
                              f"a literal brace")
        else:
            name = m.group(1).strip()
            if not _FIELD_NAME.match(name):
                raise ConfigError(f"[prompt] {key}: placeholder {tok!r} must name a field (letters, digits, _ "
                                  f"and dots for nested fields)")
            parts.append(("field", name))
        pos = m.end()
    if pos < len(template):
        parts.append(("text", template[pos:]))
    return parts


def _lookup(record: Mapping, path: str):
    """record["a"]["b"] for "a.b"; a whole key containing dots wins over the nested path. None if absent."""
    if path in record:
        return record[path]
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


# ------------------------------------------------------------------------------------------ the pipeline

@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline file. ``job(overrides)`` gives the JobConfig to run; the JobConfig fields the file
    sets (``fields``: inputs, template, model, sampling, seed, constraint, output, engine, ...) read as
    attributes too (``pipeline.model``)."""

    path: Path                          # the TOML file
    name: str
    description: str
    fields: Mapping[str, Any]           # JobConfig keyword arguments; "output" may be None (then --output)

    def __getattr__(self, key: str):
        try:
            return self.__dict__["fields"][key]
        except KeyError:
            raise AttributeError(f"{type(self).__name__!r} has no attribute {key!r}") from None

    def job(self, overrides: Mapping[str, Any] | None = None) -> JobConfig:
        """The JobConfig of this pipeline; ``overrides`` (CLI option names: model, output, temperature,
        max_batch, n, constraint, inputs, ...) replace the file's values."""
        o = dict(overrides or {})
        unknown = sorted(set(o) - _OVERRIDABLE)
        if unknown:
            raise ConfigError(f"{self.path}: cannot override {', '.join(unknown)} of a pipeline")
        fields = dict(self.fields)
        fields["sampling"] = replace(fields["sampling"], **{k: o.pop(k) for k in SAMPLING_OPTIONS if k in o})
        fields["engine"] = replace(fields["engine"], **{k: o.pop(k) for k in ENGINE_OPTIONS if k in o})
        if "system" in o and fields["template"].user is not None:      # a chat template's system turn
            fields["template"] = replace(fields["template"], system=o.pop("system"))
        if o.get("model", fields["model"]) != fields["model"]:
            fields["model_file"] = None         # the file named a file of the file's model, not of this one
        fields.update(o)
        if fields.get("output") is None:
            raise ConfigError(f"{self.path}: no output: set [output] path or give --output")
        fields["inputs"] = tuple(fields["inputs"])
        fields["output"] = str(fields["output"])
        return JobConfig(**fields, pipeline=str(self.path))


# what a command line may override: the job's fields, but not how prompts are built (the template does that)
_OVERRIDABLE = frozenset(SAMPLING_OPTIONS + ENGINE_OPTIONS + tuple(
    f.name for f in dataclass_fields(JobConfig)
    if f.name not in ("prompt_field", "chat", "template", "pipeline", "sampling", "engine")))


def load_pipeline(path) -> Pipeline:
    """Read and validate a pipeline file; ConfigError names the file, section and key of any problem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the pipeline file ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return _Loader(path, data).pipeline()
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(f"{path}:") else f"{path}: {msg}") from None


class _Loader:
    """Reads the sections of one parsed TOML document, with errors naming ``[section] key``."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        self.base = path.parent
        self.data = data
        _check_keys(data, TOP_KEYS, "")
        for section in SECTIONS:
            if section in data:
                if not isinstance(data[section], dict):
                    raise ConfigError(f"[{section}] must be a table, got {_type_name(data[section])}")
                _check_keys(data[section], KEYS[section], f"[{section}] ")
        for required in ("input", "prompt"):
            if required not in data:
                raise ConfigError(f"missing section [{required}]")

    def section(self, name: str) -> dict:
        return self.data.get(name, {})

    def get(self, section: str, key: str, kind, default=None, choices=None):
        table = self.data if section == "" else self.section(section)
        if key not in table:
            return default
        value = table[key]
        where = f"[{section}] {key}" if section else key
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where} must be an integer, got {_short(value)}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where} must be a number, got {_short(value)}")
        if kind in (str, bool, dict, list) and not isinstance(value, kind):
            raise ConfigError(f"{where} must be a {_KIND_NAMES[kind]}, got {_short(value)}")
        if choices is not None and value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {_short(value)}")
        return float(value) if kind is float else value

    def pipeline(self) -> Pipeline:
        model = self.get("model", "name", str, DEFAULT_REPO)
        if model.endswith(".gguf") or self.resolve(model).is_dir():     # a file, or a checkpoint directory
            model = str(self.resolve(model))
        output = self.get("output", "path", str)
        sampling, seed, dedupe = self.sampling()
        fields = dict(
            inputs=self.inputs(), input_format=self.get("input", "format", str, None, INPUT_FORMATS),
            id_field=self.get("input", "id_field", str, "id"), template=self.template(),
            truncate=self.get("prompt", "truncate", str, None, ("left", "right")),
            model=model, model_file=self.get("model", "file", str),
            ffn_act=self.get("model", "ffn_act", str, None, FFN_ACTS), sampling=sampling, seed=seed,
            dedupe=dedupe, constraint=self.constraint(), json_limits=self.json_limits(),
            output=None if output is None else str(self.resolve(output)),
            output_format=self.get("output", "format", str, None, OUTPUT_FORMATS),
            ordered=self.get("output", "ordered", bool, True), engine=self.engine())
        return Pipeline(path=self.path, name=self.get("", "name", str, self.path.stem),
                        description=self.get("", "description", str, ""), fields=fields)

    def resolve(self, p: str) -> Path:
        """A path of the file: relative ones are relative to the file's directory ("a/../b" -> "b")."""
        q = Path(p).expanduser()
        return q if q.is_absolute() else Path(os.path.normpath(self.base / q))

    def inputs(self) -> tuple[str, ...]:
        value = self.section("input").get("path")
        patterns = [value] if isinstance(value, str) else value
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"[input] path must be a path or glob, or a non-empty list of them, got {_short(value)}")
        files: list[str] = []
        for pattern in patterns:
            full = str(self.resolve(pattern))
            matches = sorted(glob.glob(full, recursive=True)) if glob.has_magic(full) else [full]
            if not matches:
                raise ConfigError(f"[input] path {pattern!r} matches no file (looked for {full})")
            files += [m for m in matches if m not in files]
        return tuple(files)

    def template(self) -> PromptTemplate:
        mapping = self.get("input", "fields", dict, {})
        bad = next((k for k, v in mapping.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise ConfigError(f"[input] fields.{bad} must be a string (a record field), got {_short(mapping[bad])}")
        return PromptTemplate(user=self.get("prompt", "user", str), text=self.get("prompt", "text", str),
                              system=self.get("prompt", "system", str), fields=tuple(sorted(mapping.items())))

    def sampling(self) -> tuple[SamplingParams, int, bool]:
        table = dict(self.section("sampling"))
        seed = self.get("sampling", "seed", int, 0)
        if seed < 0:
            raise ConfigError(f"[sampling] seed must be an integer >= 0, got {seed}")
        dedupe = self.get("sampling", "dedupe", bool, False)
        params = {k: v for k, v in table.items() if k not in ("seed", "dedupe")}
        try:
            return SamplingParams(**params), seed, dedupe
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith("[") else f"[sampling] {msg}") from None

    def constraint(self) -> ConstraintSpec | None:
        table = {k: v for k, v in self.section("constraint").items() if k != "json_limits"}
        if len(table) > 1:
            raise ConfigError(f"[constraint] give only one of {', '.join(KEYS['constraint'][:-1])} "
                              f"(got {', '.join(table)})")
        try:
            if "choice" in table:
                return choice_constraint(table["choice"], field="choice")
            if "regex" in table:
                return regex_constraint(table["regex"], field="regex")
            if "json_schema" in table:
                return json_schema_constraint(self.get("constraint", "json_schema", dict), field="json_schema")
            if "json_schema_file" in table:
                return json_schema_constraint(self._schema_file(), field="json_schema_file")
            if "response_format" in table:
                return response_format_constraint(self.get("constraint", "response_format", dict))
        except ConfigError as e:
            raise ConfigError(f"[constraint] {e}") from None
        return None

    def json_limits(self) -> JsonLimits:
        """[constraint] json_limits: a table of bounds, or a string as on the command line ("none", "digits=20")."""
        value = self.section("constraint").get("json_limits")
        try:
            return JsonLimits() if value is None else JsonLimits.parse(value)
        except ConfigError as e:
            raise ConfigError(f"[constraint] json_limits: {e}") from None

    def _schema_file(self):
        rel = self.get("constraint", "json_schema_file", str)
        full = self.resolve(rel)
        try:
            return json.loads(full.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"json_schema_file {rel!r} cannot be read ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"json_schema_file {rel!r} is not valid JSON ({e.msg} at line {e.lineno})") from None

    def engine(self) -> EngineConfig:
        kinds = {f.name: {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
                 for f in dataclass_fields(EngineConfig)}
        values = {k: self.get("engine", k, kinds[k]) for k in KEYS["engine"] if k in self.section("engine")}
        try:
            return EngineConfig(**values)
        except ConfigError as e:
            raise ConfigError(f"[engine] {e}") from None


_KIND_NAMES = {str: "string", bool: "boolean (true or false)", dict: "table", list: "list"}


def _check_keys(table: dict, known: tuple, where: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
            what = "section" if not where and key not in TOP_KEYS and isinstance(table[key], dict) else "key"
            raise ConfigError(f"{where}unknown {what} {key!r}{hint}")


def _type_name(value) -> str:
    return {str: "string", bool: "boolean", int: "integer", float: "number", dict: "table",
            list: "list"}.get(type(value), type(value).__name__)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_pipeline_file(path) -> bool:
    """True for a ``.toml`` path (how ``bitnet-batch run`` recognises a pipeline given as its input)."""
    return Path(path).suffix.lower() == ".toml"


__all__ = ["Pipeline", "PromptTemplate", "load_pipeline", "is_pipeline_file"]
