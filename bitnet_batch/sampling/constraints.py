"""Structured output: a grammar that masks the sampler's vocabulary, one step of the chain per request.

A request (or the job) asks for one of three constraint kinds, given in the OpenAI / vLLM shapes:

* ``response_format``: ``{"type": "json_object"}`` (any JSON object), ``{"type": "json_schema", "json_schema":
  {"schema": {...}}}`` (a JSON value valid under the schema) or ``{"type": "text"}`` (no constraint: turns a
  job-level default off for one item);
* ``regex``: a Rust-syntax regular expression the whole output must match;
* ``choice``: a list of strings, the output is exactly one of them.

``ConstraintSpec`` is the validated, frozen description (grammar compiled to llguidance's format and checked
without a tokenizer, so a bad schema fails before any model work). ``ConstraintCompiler`` binds specs to one
model vocabulary: it builds llguidance's tokenizer view once and caches one compiled matcher per grammar;
every request gets a cheap ``deep_copy``. ``GrammarConstraint`` is the sampler chain's ``MaskSource``:
``allowed_tokens()`` fills an int32 bitmask [ceil(V/32)] (bit j of word i allows token 32*i + j) that the
chain's ``TokenMask`` step applies with its compiled kernel; ``accept(token)`` advances the grammar.

End-of-generation tokens are allowed only where the grammar accepts; once the grammar can take no further
token (``finished``) the completion ends with finish reason ``stop``. JSON is generated compactly with
``", "`` and ``": "`` separators (no free whitespace; a schema's ``x-guidance`` key can change that).

``JsonLimits`` bounds what a JSON schema leaves open-ended, so that an output can always finish (a small model
at temperature 1 otherwise writes numbers hundreds of digits long until ``max_tokens`` cuts them):

* numbers: at most ``digits`` digits before the exponent and ``exponent`` digits in it. JSON schema has no
  keyword for this (llguidance's ``minimum``/``maximum`` bound the integer part but neither the fraction nor
  a run of zeros), so a second, lexical grammar runs beside the schema's: any JSON text whose number literals
  keep to the bound. Each token must satisfy both (``GrammarConstraint``), which reaches the numbers inside
  values of any type too. Should the schema itself need a longer number (``const``, a huge ``minimum``), the
  two masks share no token; the lexical bound is then dropped for that output, never the schema.
* strings and arrays: a string schema without ``maxLength`` (and without ``enum``, ``const`` or ``pattern``)
  gets ``maxLength = string``; an array schema without ``maxItems`` gets ``maxItems = items`` (never below its
  own ``minLength`` / ``minItems``). Should the bounded schema not compile (a ``minLength`` elsewhere in an
  ``allOf``), the schema is used as given.

Objects are not closed for the user: an object that does not set ``additionalProperties: false`` may take any
number of extra keys (llguidance does not even keep them unique) with values of any type.
"""
from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields as dataclass_fields
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError, InputError
from .steps import SamplingError

KINDS = ("json", "regex", "choice")
FIELDS = ("response_format", "regex", "choice")       # the request fields that carry a constraint
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CHOICES = 10_000
_MATCHER_CACHE = 256                                   # compiled grammars kept per vocabulary
LIMIT_RANGES = {"digits": 100, "exponent": 10, "string": None, "items": None}   # largest accepted (None: any)


@dataclass(frozen=True)
class JsonLimits:
    """Bounds on what a JSON schema leaves open-ended, so that every JSON output can finish (module doc).
    0 turns a bound off; ``JsonLimits.none()`` is the schema exactly as given."""

    digits: int = 17
    """Most digits of a number before its exponent, integer and fraction together, leading zeros included (so
    ``0.000...`` cannot run on either). 17 write any float64 exactly (Python's repr needs at most 17), and
    integers up to 10**17; more digits carry nothing once the number is parsed into a double."""

    exponent: int = 3
    """Most digits of a number's exponent: 3 span float64's range (1e-308 .. 1e308)."""

    string: int = 256
    """``maxLength`` of string schemas that set none: a name, a title, a sentence or two. Fields meant for
    longer text say so with their own ``maxLength``."""

    items: int = 32
    """``maxItems`` of array schemas that set none."""

    def __post_init__(self):
        for f in dataclass_fields(self):
            value, top = getattr(self, f.name), LIMIT_RANGES[f.name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (top and value > top):
                upto = f" and <= {top}" if top else ""
                raise ConfigError(f"json limit {f.name} must be an integer >= 0{upto} (0: no bound), got {value!r}")

    @classmethod
    def none(cls) -> "JsonLimits":
        return cls(digits=0, exponent=0, string=0, items=0)

    @classmethod
    def parse(cls, value) -> "JsonLimits":
        """From ``"none"``, ``"digits=20,string=1000"`` (the keys given replace the defaults), a mapping of the
        same keys, or a JsonLimits. Raises ConfigError naming the bad key or value."""
        if isinstance(value, JsonLimits):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.lower() == "none":
                return cls.none()
            pairs = [p.partition("=") for p in text.split(",") if p.strip()]
            bad = next((k for k, eq, _ in pairs if not eq), None)
            if bad is not None:
                raise ConfigError(f"json limits must be 'none' or KEY=N pairs separated by commas "
                                  f"({', '.join(LIMIT_RANGES)}), got {bad.strip()!r}")
            value = {k.strip(): v.strip() for k, _, v in pairs}
            value = {k: int(v) if v.isdigit() else v for k, v in value.items()}
        if not isinstance(value, Mapping):
            raise ConfigError(f"json limits must be 'none', KEY=N pairs or a table, got {_short(value)}")
        unknown = sorted(set(value) - set(LIMIT_RANGES))
        if unknown:
            raise ConfigError(f"unknown json limit {unknown[0]!r} (known: {', '.join(LIMIT_RANGES)})")
        return cls(**value)

    def describe(self) -> dict:
        """JSON-serialisable, for the job fingerprint and summary."""
        return asdict(self)

    def bound_schema(self, schema):
        """``schema`` with ``maxLength`` / ``maxItems`` added where it sets none (a new object; the given one
        is not modified)."""
        if not (self.string or self.items):
            return schema
        return _bound_schema(schema, self)


DEFAULT_LIMITS = JsonLimits()


@dataclass(frozen=True)
class ConstraintSpec:
    """One validated constraint. Build it with ``constraint_from_fields`` or the ``*_constraint`` helpers."""

    kind: str
    """"json" | "regex" | "choice"."""

    field: str
    """Where it came from ("response_format", "regex", "choice", "json_schema", ...); errors name it."""

    grammar: str
    """The llguidance grammar (JSON text), already validated."""

    source: Any
    """The value as given (the response_format object, the pattern, the list of choices): for fingerprints
    and the job summary."""

    bound: str | None = None
    """JSON only: the llguidance grammar of the number bound, checked beside ``grammar`` (None: no bound)."""

    limits: JsonLimits | None = None
    """JSON only: the limits ``grammar`` and ``bound`` were built with."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.field, str) or not self.field:
            raise ConfigError(f"constraint field must be a non-empty string, got {self.field!r}")

    def describe(self) -> dict:
        """The constraint as a request would give it (``{"response_format": {...}}``, ``{"regex": ...}`` or
        ``{"choice": [...]}``): JSON-serialisable and stable, for the job fingerprint and summary."""
        key = {"json": "response_format", "regex": "regex", "choice": "choice"}[self.kind]
        return {key: self.source}

    def parse(self, text: str) -> Any:
        """The value a complete output stands for: the decoded JSON value, or the matched string itself.
        Raises ValueError when ``text`` is not valid JSON (an output cut short)."""
        return json.loads(text) if self.kind == "json" else text

    def with_limits(self, limits: JsonLimits) -> "ConstraintSpec":
        """This constraint built with other JSON limits (regex and choice constraints have none)."""
        if self.kind != "json" or self.limits == limits:
            return self
        source = self.source
        schema = {"type": "object"} if source.get("type") == "json_object" else source["json_schema"]["schema"]
        return json_schema_constraint(schema, field=self.field, source=source, limits=limits)


# ------------------------------------------------------------------------------------- building specs

def json_schema_constraint(schema: Mapping, *, field: str = "json_schema", source: Any = None,
                           limits: JsonLimits = DEFAULT_LIMITS) -> ConstraintSpec:
    """A constraint to JSON values valid under ``schema`` (a dict; ``{"type": "object"}`` = any object),
    bounded by ``limits``. ``source``: the response_format object it came from (default: one wrapping
    ``schema``)."""
    if not isinstance(schema, Mapping):
        raise ConfigError(f"{field}: the JSON schema must be an object, got {_type_name(schema)}")
    text = _canonical_json(schema, field)
    if source is None:
        source = {"type": "json_schema", "json_schema": {"schema": json.loads(text)}}
    return ConstraintSpec("json", field, _compiled("json", text, field, limits), source,
                          bound=_lexical_compiled(limits.digits, limits.exponent), limits=limits)


def regex_constraint(pattern: str, *, field: str = "regex") -> ConstraintSpec:
    """A constraint to outputs that match ``pattern`` (Rust regex syntax) as a whole."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{field} must be a non-empty string (a regular expression), got {_short(pattern)}")
    return ConstraintSpec("regex", field, _compiled("regex", pattern, field), pattern)


def choice_constraint(options, *, field: str = "choice") -> ConstraintSpec:
    """A constraint to exactly one of ``options`` (a non-empty list of non-empty strings)."""
    if isinstance(options, str) or not isinstance(options, (list, tuple)) or not options:
        raise ConfigError(f"{field} must be a non-empty list of strings, got {_short(options)}")
    bad = next((i for i, o in enumerate(options) if not isinstance(o, str) or not o), None)
    if bad is not None:
        raise ConfigError(f"{field}[{bad}] must be a non-empty string, got {_short(options[bad])}")
    if len(options) > MAX_CHOICES:
        raise ConfigError(f"{field} must have at most {MAX_CHOICES} options, got {len(options)}")
    unique = list(dict.fromkeys(options))
    return ConstraintSpec("choice", field, _compiled("choice", json.dumps(unique), field), unique)


def response_format_constraint(value, *, field: str = "response_format",
                               limits: JsonLimits = DEFAULT_LIMITS) -> ConstraintSpec | None:
    """An OpenAI ``response_format`` object -> spec; ``{"type": "text"}`` -> None (no constraint)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{field} must be an object with a 'type' of {', '.join(RESPONSE_FORMAT_TYPES)}, "
                          f"got {_short(value)}")
    kind = value.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise ConfigError(f"{field}.type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, got {_short(kind)}")
    extra = sorted(set(value) - {"type", "json_schema"})
    if extra or (kind != "json_schema" and "json_schema" in value):
        unknown = extra or ["json_schema"]
        raise ConfigError(f"{field}: unexpected key {unknown[0]!r} for type {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_constraint({"type": "object"}, field=field, source=dict(value), limits=limits)
    wrapper = value.get("json_schema")
    if not isinstance(wrapper, Mapping) or not isinstance(wrapper.get("schema"), Mapping):
        raise ConfigError(f"{field}.json_schema must be an object with a 'schema' object "
                          f"({{\"name\": ..., \"schema\": {{...}}}}), got {_short(wrapper)}")
    source = json.loads(_canonical_json(dict(value), field))
    return json_schema_constraint(wrapper["schema"], field=f"{field}.json_schema.schema", source=source,
                                  limits=limits)


def constraint_from_fields(fields: Mapping, limits: JsonLimits = DEFAULT_LIMITS
                           ) -> tuple[bool, ConstraintSpec | None]:
    """The constraint a record's raw fields ask for: (given, spec). ``given`` is False when the record names
    none of ``FIELDS`` (the job default applies); spec None with given True means "no constraint" (type text).
    Raises ConfigError naming the field; at most one of the fields may be set."""
    present = [f for f in FIELDS if fields.get(f) is not None]
    if not present:
        return False, None
    if len(present) > 1:
        raise ConfigError(f"{present[1]}: give only one of {', '.join(FIELDS)} (this record has "
                          f"{' and '.join(present)})")
    name = present[0]
    value = fields[name]
    if name == "regex":
        return True, regex_constraint(value)
    if name == "choice":
        return True, choice_constraint(value)
    return True, response_format_constraint(value, limits=limits)


def request_constraint(overrides: Mapping, default: ConstraintSpec | None, location: str | None = None,
                       limits: JsonLimits = DEFAULT_LIMITS) -> ConstraintSpec | None:
    """A request's constraint: its own fields (JSON ones bounded by the job's ``limits``), else the job
    ``default``. Errors are ``InputError`` naming the record's location and the field."""
    try:
        given, spec = constraint_from_fields(overrides, limits)
    except ConfigError as e:
        msg = str(e)
        field = next((f for f in FIELDS if msg.startswith(f)), None)
        raise InputError(msg, location=location, field=field) from None
    return spec if given else default


def job_constraint(*, response_format=None, json_schema=None, regex=None, choice=(),
                   limits: JsonLimits = DEFAULT_LIMITS) -> ConstraintSpec | None:
    """The job-level default from CLI / pipeline options (at most one); raises ConfigError."""
    given = [name for name, v in (("response_format", response_format), ("json_schema", json_schema),
                                  ("regex", regex), ("choice", choice)) if v]
    if len(given) > 1:
        raise ConfigError(f"give only one of --response-format, --json-schema, --regex, --choice "
                          f"(got {', '.join(given)})")
    if response_format is not None:
        return response_format_constraint(response_format, limits=limits)
    if json_schema is not None:
        return json_schema_constraint(json_schema, field="json_schema", limits=limits)
    if regex is not None:
        return regex_constraint(regex)
    if choice:
        return choice_constraint(list(choice))
    return None


# --------------------------------------------------------------------------------- grammar compilation

_compile_lock = threading.Lock()
_compile_cache: "OrderedDict[tuple, str]" = OrderedDict()


def _compiled(kind: str, text: str, field: str, limits: JsonLimits | None = None) -> str:
    """llguidance grammar for (kind, text), validated without a tokenizer; a JSON schema's strings and arrays
    bounded by ``limits`` (as given when the bounded schema does not compile). Cached: the same schema on
    every line of a dataset is compiled once."""
    key = (kind, text, limits)
    with _compile_lock:
        hit = _compile_cache.get(key)
        if hit is not None:
            _compile_cache.move_to_end(key)
            return hit
    grammar = None
    if kind == "json" and limits is not None and (limits.string or limits.items):
        bounded = _canonical_json(limits.bound_schema(json.loads(text)), field)
        if bounded != text:
            try:
                grammar = _grammar(kind, bounded, field)
            except ConfigError:     # e.g. a minLength in an allOf above our maxLength: the schema as given
                grammar = None
    if grammar is None:
        grammar = _grammar(kind, text, field)
    with _compile_lock:
        _compile_cache[key] = grammar
        while len(_compile_cache) > _MATCHER_CACHE:
            _compile_cache.popitem(last=False)
    return grammar


def _grammar(kind: str, text: str, field: str) -> str:
    import llguidance as llg

    try:
        if kind == "json":
            grammar = llg.LLMatcher.grammar_from_json_schema(text, defaults=dict(JSON_OPTIONS))
        elif kind == "regex":
            grammar = llg.LLMatcher.grammar_from_regex(text)
        else:
            lark = "start: " + " | ".join(json.dumps(o) for o in json.loads(text))
            grammar = llg.LLMatcher.grammar_from_lark(lark)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{field}: {_what(kind)} is not valid: {_first_line(str(e))}") from None
    problem = llg.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ConfigError(f"{field}: {_what(kind)} is not valid: {_first_line(problem)}")
    return grammar


# ------------------------------------------------------------------------------------------ JSON limits

_SCHEMA_KEYS = ("additionalProperties", "items", "additionalItems", "contains", "not", "if", "then", "else",
                "propertyNames", "unevaluatedProperties", "unevaluatedItems")          # a subschema
_SCHEMA_LIST_KEYS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")                # a list of them
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")   # name -> one


def _bound_schema(node, limits: JsonLimits):
    """A copy of the schema ``node`` with ``maxLength`` / ``maxItems`` where a string / array schema has none
    (module doc). Walks every subschema keyword; enum, const, default and examples hold values, not schemas."""
    if not isinstance(node, Mapping):
        return node
    out = dict(node)
    for key in _SCHEMA_KEYS:
        if isinstance(out.get(key), Mapping):
            out[key] = _bound_schema(out[key], limits)
    for key in _SCHEMA_LIST_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [_bound_schema(s, limits) for s in out[key]]
    for key in _SCHEMA_MAP_KEYS:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: _bound_schema(s, limits) for name, s in out[key].items()}
    kinds = out.get("type")
    kinds = {kinds} if isinstance(kinds, str) else set(kinds) if isinstance(kinds, list) else set()
    fixed = "enum" in out or "const" in out
    if limits.string and "string" in kinds and not fixed and "maxLength" not in out and "pattern" not in out:
        out["maxLength"] = max(limits.string, _count(out.get("minLength")))
    closed_tuple = out.get("items") is False and isinstance(out.get("prefixItems"), list)
    if limits.items and "array" in kinds and not fixed and "maxItems" not in out and not closed_tuple:
        out["maxItems"] = max(limits.items, _count(out.get("minItems")))
    return out


def _count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _number_regex(digits: int, exponent: int) -> str:
    """A JSON number with at most ``digits`` digits before its exponent and ``exponent`` in it (0: any)."""
    parts = []
    for k in range(1, digits + 1):            # k integer digits (no leading zero), then <= digits - k decimals
        whole = "[0-9]" if k == 1 else f"[1-9][0-9]{{{k - 1}}}"
        parts.append(whole + (f"(?:\\.[0-9]{{1,{digits - k}}})?" if k < digits else ""))
    exp = f"[0-9]{{1,{exponent}}}" if exponent else "[0-9]+"
    return f"-?(?:{'|'.join(parts)})(?:[eE][+-]?{exp})?"


def _lexical_grammar(digits: int, exponent: int) -> str:
    """Lark: any sequence of JSON tokens (strings, bounded numbers, literals, punctuation, whitespace) where a
    value is always followed by punctuation or whitespace, so two numbers cannot run together into one."""
    return "\n".join([
        "start: SEP* (value SEP+)* value?",
        "value: STRING | NUMBER | LITERAL",
        r"SEP: /[\[\]{},:\x20\x0A\x0D\x09]/",
        r'STRING: /"(?:[^"\\]|\\(?s:.))*"/',
        f"NUMBER: /{_number_regex(digits, exponent)}/",
        'LITERAL: "true" | "false" | "null"',
    ])


@lru_cache(maxsize=16)
def _lexical_compiled(digits: int, exponent: int) -> str | None:
    """The validated llguidance grammar of the number bound (None when ``digits`` is 0)."""
    if not digits:
        return None
    import llguidance as llg

    grammar = llg.LLMatcher.grammar_from_lark(_lexical_grammar(digits, exponent))
    problem = llg.LLMatcher.validate_grammar(grammar)
    if problem:  # pragma: no cover - a bug in _lexical_grammar, not a user error
        raise AssertionError(f"number bound grammar: {problem}")
    return grammar


def _what(kind: str) -> str:
    return {"json": "JSON schema", "regex": "regular expression", "choice": "choice list"}[kind]


def _first_line(msg: str) -> str:
    """llguidance errors carry a multi-line caret diagram; the summary is enough in an output record."""
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    detail = next((ln for ln in lines if ln.startswith("error:")), None)
    head = lines[0] if lines else msg
    return f"{head} ({detail[6:].strip()})" if detail and detail != head else head


# ----------------------------------------------------------------------------- binding to a vocabulary

class ConstraintCompiler:
    """Specs -> per-request ``GrammarConstraint`` for one tokenizer. Builds llguidance's tokenizer once
    (~15 ms for 512 tokens, ~3 s for LLaMA-3's 128k, so it is shared through ``for_tokenizer``) and keeps one
    compiled matcher per grammar; requests get copies."""

    def __init__(self, tokenizer):
        import llguidance as llg

        self.vocab_size = int(tokenizer.vocab_size)
        self.eog_ids = sorted(int(i) for i in tokenizer.eog_ids)
        if not self.eog_ids:
            raise ConfigError("structured output needs an end-of-generation token; the vocabulary has none")
        self.lltok = llg.LLTokenizer(tokenizer.hf.to_str(), n_vocab=self.vocab_size, eos_token=self.eog_ids)
        self.banned = self._mismatched_ids(tokenizer)
        self._matchers: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _mismatched_ids(self, tokenizer) -> np.ndarray:
        """Ids whose bytes llguidance sees differently from our decoder (the lone byte 0xFF, which llguidance
        uses as its special-token marker): never allowed, so the grammar and the text cannot diverge."""
        ids = [i for i in range(self.vocab_size)
               if not tokenizer.is_control(i) and self.lltok.decode_bytes([i]) != tokenizer.token_bytes(i)]
        return np.asarray(ids, dtype=np.int64)

    def make(self, spec: ConstraintSpec) -> "GrammarConstraint":
        """A fresh constraint (grammar at its start) for one request. Raises ConfigError naming the field
        when the grammar cannot be used with this vocabulary."""
        bound = self._matcher(spec.bound, spec).deep_copy() if spec.bound is not None else None
        return GrammarConstraint(spec, self.prepare(spec).deep_copy(), self.vocab_size, self.banned, bound=bound)

    def prepare(self, spec: ConstraintSpec):
        """The compiled matcher of ``spec`` (cached; requests get copies). Raises ConfigError naming the
        field when the grammar cannot be used with this vocabulary."""
        if spec.bound is not None:
            self._matcher(spec.bound, spec)
        return self._matcher(spec.grammar, spec)

    def _matcher(self, grammar: str, spec: ConstraintSpec):
        import llguidance as llg

        with self._lock:
            m = self._matchers.get(grammar)
            if m is not None:
                self._matchers.move_to_end(grammar)
                return m
        m = llg.LLMatcher(self.lltok, grammar, log_level=0)
        if m.is_error():
            raise ConfigError(f"{spec.field}: {_what(spec.kind)} cannot be used: {_first_line(m.get_error())}")
        with self._lock:
            self._matchers[grammar] = m
            while len(self._matchers) > _MATCHER_CACHE:
                self._matchers.popitem(last=False)
        return m

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "ConstraintCompiler":
        """The shared compiler of ``tokenizer`` (created on first use, dropped with the tokenizer)."""
        with _compilers_lock:
            comp = _compilers.get(tokenizer)
            if comp is None:
                comp = _compilers[tokenizer] = cls(tokenizer)
            return comp


_compilers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


class GrammarConstraint:
    """One request's grammar state: the sampler chain's mask source (``allowed_tokens``/``accept``/``reset``).

    ``bound``: the matcher of the JSON number bound (module doc), advanced in step with the grammar; a token
    must be allowed by both. When they share no token (the schema needs a longer number), the bound is dropped
    for the rest of this output (``bounded`` turns False) and the grammar alone decides."""

    def __init__(self, spec: ConstraintSpec, matcher, vocab_size: int, banned: np.ndarray, bound=None):
        self.spec = spec
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._banned_words = banned >> 5                              # int64 [b] word of each banned id
        self._banned_bits = (np.int64(1) << (banned & 31)).astype(np.uint32).view(np.int32)   # [b]
        self._mask = np.empty(-(-vocab_size // 32), dtype=np.int32)   # [ceil(V/32)] bit j of word i: id 32i+j
        self._pre: np.ndarray | None = None     # this position's mask when a MaskBatch computed it already
        self._final: np.ndarray | None = None   # this position's mask once allowed_tokens gave it
        self._bound_start = bound               # the bound at its start, for reset()
        self.bound = bound                      # the bound in step with the grammar, or None
        if bound is not None:
            self._bound_mask = np.empty_like(self._mask)               # [ceil(V/32)] the bound's own mask
            self._both = np.empty_like(self._mask)                     # [ceil(V/32)] grammar & bound
        self._pre_bound: np.ndarray | None = None

    @property
    def bounded(self) -> bool:
        """Whether the number bound still applies to this output."""
        return self.bound is not None

    @property
    def mask_ready(self) -> bool:
        """Whether this position's mask was computed already (``allowed_tokens`` returns it as it is)."""
        return self._final is not None

    def allowed_tokens(self) -> np.ndarray:
        """The bitmask of the tokens the grammar (and the number bound) allow next (EOG only where it accepts):
        computed once per position (the engine may ask before the sampler), the same array until ``accept`` or
        ``reset``; a later position's may reuse it."""
        if self._final is not None:
            return self._final
        m, self._pre = self._pre, None
        b, self._pre_bound = self._pre_bound, None
        if m is None:
            self._check()
            m = self._mask
            self.matcher.unsafe_compute_mask_ptr(m.ctypes.data, m.nbytes)
        if self.bound is not None:
            if b is None:
                b = self._bound_mask
                self.bound.unsafe_compute_mask_ptr(b.ctypes.data, b.nbytes)
            both = np.bitwise_and(m, b, out=self._both)
            if both.any():
                m = both
            else:                   # the schema itself needs what the bound forbids: the schema wins
                self.bound = None
        if self._banned_words.size:
            m[self._banned_words] &= ~self._banned_bits
        if m is not self._mask and m is not getattr(self, "_both", None):
            np.copyto(self._mask, m)        # a MaskBatch row: the next fill reuses it
            m = self._mask
        self._final = m
        return m

    def accept(self, token: int) -> None:
        self._final = self._pre = self._pre_bound = None
        if not self.matcher.consume_token(int(token)):
            raise SamplingError(f"{self.spec.field}: token {int(token)} does not fit the grammar "
                                f"({_first_line(self.matcher.get_error())})")
        if self.bound is not None and not self.bound.consume_token(int(token)):
            self.bound = None       # a token from the grammar alone (no mask was asked for): stop bounding

    def reset(self) -> None:
        self.matcher.reset()
        self._pre = self._pre_bound = self._final = None
        self.bound = self._bound_start
        if self.bound is not None:
            self.bound.reset()

    @property
    def finished(self) -> bool:
        """No token but end-of-generation can follow: the output is complete."""
        return bool(self.matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """The output so far is a complete match (more may still be allowed, e.g. ``[a-z]+``)."""
        return bool(self.matcher.is_accepting())

    def result(self, text: str, cut: bool) -> dict:
        """The extra record fields of a finished request: ``parsed`` (None unless complete) and
        ``incomplete`` (the grammar was not satisfied when generation ended, or a stop string cut the
        text, ``cut``)."""
        if cut or not (self.accepting or self.finished):
            return {"parsed": None, "incomplete": True}
        try:
            return {"parsed": self.spec.parse(text), "incomplete": False}
        except ValueError:
            return {"parsed": None, "incomplete": True}

    def _check(self) -> None:
        if self.matcher.is_error():
            raise SamplingError(f"{self.spec.field}: grammar error ({_first_line(self.matcher.get_error())})")


class MaskBatch:
    """The next-token masks of many requests at once, on llguidance's own thread pool (outside the GIL): the
    engine's threads are idle while a step's requests sample, so the masks use the cores they released. Each
    constraint then returns its precomputed row from ``allowed_tokens`` (same bits as computing it alone)."""

    def __init__(self, vocab_size: int, threads: int | None = None):
        import llguidance as llg

        self.words = -(-vocab_size // 32)
        self._executor = llg.LLExecutor(num_threads=threads)
        self._rows = np.empty((0, self.words), dtype=np.int32)     # [B, ceil(V/32)] one mask per request

    def fill(self, constraints: list[GrammarConstraint]) -> None:
        """Compute the masks of ``constraints`` (this step's constrained requests, and their number bounds);
        fewer than two, or a matcher in an error state, are left to compute (and report) their own."""
        ready = [c for c in constraints if not c.matcher.is_error() and not c.mask_ready]
        if len(ready) < 2:
            return
        jobs = [(c.matcher, i) for i, c in enumerate(ready)]
        bounded = [c for c in ready if c.bound is not None and not c.bound.is_error()]
        jobs += [(c.bound, len(ready) + j) for j, c in enumerate(bounded)]
        if self._rows.shape[0] < len(jobs):
            self._rows = np.empty((len(jobs), self.words), dtype=np.int32)
        rows = self._rows
        self._executor.unsafe_compute_mask_ptr(jobs, rows.ctypes.data, rows.shape[1] * rows.itemsize,
                                               rows.shape[0])
        for i, c in enumerate(ready):
            c._pre = rows[i]
        for j, c in enumerate(bounded):
            c._pre_bound = rows[len(ready) + j]


# ------------------------------------------------------------------------------------------- helpers

def _canonical_json(value, field: str) -> str:
    """Compact JSON text, keys in the given order (a schema's property order is the output's order)."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{field}: the JSON schema is not plain JSON ({e})") from None


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_json_arg(value: str, what: str) -> Any:
    """A CLI value that is either inline JSON or the path of a JSON file (``--response-format``)."""
    text = value
    if not value.lstrip().startswith(("{", "[")):
        try:
            with open(value, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"{what}: {value!r} is neither inline JSON nor a readable file "
                              f"({e.strerror or e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        src = "inline value" if text is value else value
        raise ConfigError(f"{what}: {src} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") \
            from None


__all__ = ["ConstraintSpec", "ConstraintCompiler", "GrammarConstraint", "MaskBatch", "JsonLimits", "DEFAULT_LIMITS",
           "KINDS", "FIELDS", "JSON_OPTIONS",
           "json_schema_constraint", "regex_constraint", "choice_constraint", "response_format_constraint",
           "constraint_from_fields", "request_constraint", "job_constraint", "load_json_arg"]
