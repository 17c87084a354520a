"""Sampling parameters of one request: documented, validated once, frozen.

``SamplingParams`` is built from the job defaults; ``SamplingParams.from_overrides`` lays an input item's raw
JSON values on top. Every error names the field, the allowed range and the value, e.g.
``top_p must be in (0, 1], got 1.5``. ``derive_seed`` gives a request its own RNG seed from the job seed and
the request id, identical in every process and on every platform.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from ..errors import ConfigError

MAX_LOGPROBS = 20       # vLLM's default cap on the number of top logprobs per token
MAX_SAMPLES = 1024      # most samples per input (n)
_SEED_LIMIT = 2 ** 64   # seeds are 64-bit so that every platform stores them the same way
TOP_K_ONLY_MAX = 256    # largest top-k whose rows an engine computes near the k best only (``top_k_only``)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. The defaults give greedy decoding of up to 256 tokens."""

    max_tokens: int = 256
    """Most tokens to generate (>= 0). Generation ends with finish reason ``length`` when reached."""

    temperature: float = 0.0
    """Divides the logits before the truncation steps (>= 0). 0 means greedy: the argmax after penalties and
    masks, ties going to the lowest token id, without drawing from the RNG."""

    top_k: int = 0
    """Keep only the k most likely tokens (ties by ascending id), >= 0; 0 turns it off."""

    top_p: float = 1.0
    """Nucleus sampling: keep the smallest prefix of tokens (by descending probability, ties by ascending id)
    whose probability mass is >= top_p, in (0, 1]; 1 turns it off."""

    min_p: float = 0.0
    """Drop tokens whose probability is below ``min_p`` times the most likely token's, in [0, 1); 0 is off."""

    repetition_penalty: float = 1.0
    """llama.cpp / HF repetition penalty (> 0) over every token seen (prompt and generated): a positive logit
    is divided by it, a negative one multiplied. 1 turns it off."""

    presence_penalty: float = 0.0
    """OpenAI presence penalty in [-2, 2]: subtracted once from the logit of every generated token."""

    frequency_penalty: float = 0.0
    """OpenAI frequency penalty in [-2, 2]: subtracted once per occurrence of a token among generated ones."""

    seed: int | None = None
    """This request's RNG seed in [0, 2**64). None: derived from (job seed, request id) by ``derive_seed``."""

    stop: tuple[str, ...] = ()
    """Stop strings (non-empty). Generation ends before the first one; it is not part of the output. A single
    string is accepted and becomes a one-element tuple."""

    logprobs: int | None = None
    """Number of top logprobs to report per generated token, 0..20 (the chosen token's logprob is always
    reported when this is not None). None turns logprobs off."""

    ignore_eos: bool = False
    """Keep generating past end-of-generation tokens: they are masked out and never sampled."""

    n: int = 1
    """Samples per input, 1..1024: each is a request of its own, seeded from (the request's seed, its index k),
    written with a ``sample_index`` field (sample 0 is the n = 1 output)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = _VALIDATORS[f.name](f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0)."""
        return self.temperature == 0.0

    @property
    def argmax_only(self) -> bool:
        """True when a token is the argmax of the logits (among the tokens a constraint allows and ``ignore_eos``
        leaves: ``Sampler.banned_ids``) and nothing else of them is used: greedy, no penalties, no logprobs (an
        engine may then compute the logits near the maximum alone: ``EngineConfig.argmax_head``)."""
        return self.greedy and self._logits_unchanged

    @property
    def top_k_only(self) -> int:
        """k when a token is drawn from the k best logits alone (top-k sampling, k <= TOP_K_ONLY_MAX, with no
        penalties or logprobs: the rest of the vocabulary never counts, not even for normalising; among the tokens
        a constraint allows and ``ignore_eos`` leaves), else 0 (an engine may then compute the logits of the
        candidates for the k best alone)."""
        if self.greedy or not 0 < self.top_k <= TOP_K_ONLY_MAX or not self._logits_unchanged:
            return 0
        return self.top_k

    @property
    def _logits_unchanged(self) -> bool:
        """No step before the selection changes or reads other logits than a mask would: no penalties, no logprobs
        (the ids ``ignore_eos`` bans are a mask, like a constraint's)."""
        return (self.repetition_penalty == 1.0 and self.presence_penalty == 0.0 and self.frequency_penalty == 0.0
                and self.logprobs is None)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The keys ``from_overrides`` understands."""
        return frozenset(f.name for f in fields(cls))

    @classmethod
    def from_overrides(cls, base: "SamplingParams", overrides: Mapping[str, Any]) -> "SamplingParams":
        """``base`` with the fields named in ``overrides`` (raw JSON values) replaced.

        Keys that are not fields are ignored (the caller decides whether to warn about them). Values are checked
        exactly like constructor arguments: a bool is not an integer, a float is not an integer, ``stop`` may be
        a string or a list of strings, ``null`` is accepted only by ``seed`` and ``logprobs``.
        """
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"sampling overrides must be an object, got {type(overrides).__name__}")
        known = cls.field_names()
        changes = {k: v for k, v in overrides.items() if k in known}
        return replace(base, **changes) if changes else base


def resolve_seed(params: SamplingParams, job_seed: int, request_id: str | int) -> int:
    """The seed a request's sampler uses: its own ``seed`` if set, else ``derive_seed(job_seed, request_id)``."""
    return params.seed if params.seed is not None else derive_seed(job_seed, request_id)


def derive_seed(job_seed: int, request_id: str | int) -> int:
    """A 64-bit seed for one request, from SHA-256 of (job seed, id type, id).

    Stable across processes, Python versions and platforms (``hash()`` is salted per process). The id's type
    is part of the hashed text, so the string id ``"1"`` and the integer id ``1`` get different seeds.
    """
    if isinstance(job_seed, bool) or not isinstance(job_seed, int):
        raise ConfigError(f"job seed must be an integer, got {job_seed!r}")
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
        raise ConfigError(f"request id must be a string or an integer, got {request_id!r}")
    kind = "str" if isinstance(request_id, str) else "int"
    text = f"bitnet-batch/seed/v1\x00{job_seed}\x00{kind}\x00{request_id}"
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


# --- validators: each takes (field name, raw value) and returns the normalised value or raises ConfigError ---

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(name: str, value: Any, rule: str) -> float:
    """A finite real number (an int is accepted and converted; a bool is not a number)."""
    try:
        x = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:   # an int too large for a float
        x = math.nan
    if not math.isfinite(x):
        raise ConfigError(f"{name} must be a number {rule}, got {value!r}")
    return x


def _int_at_least(low: int):
    def check(name: str, value: Any) -> int:
        if not _is_int(value) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        return int(value)
    return check


def _int_in(low: int, high: int):
    def check(name: str, value: Any) -> int:
        if not _is_int(value) or not low <= value <= high:
            raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        return int(value)
    return check


def _float_in(low: float, high: float, low_open: bool, high_open: bool):
    rule = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(name: str, value: Any) -> float:
        x = _as_float(name, value, rule)
        if x < low or x > high or (low_open and x == low) or (high_open and x == high):
            raise ConfigError(f"{name} must be {rule}, got {value!r}")
        return x
    return check


def _float_at_least(low: float, low_open: bool):
    rule = f"{'>' if low_open else '>='} {low:g}"

    def check(name: str, value: Any) -> float:
        x = _as_float(name, value, rule)
        if x < low or (low_open and x == low):
            raise ConfigError(f"{name} must be a number {rule}, got {value!r}")
        return x
    return check


def _check_seed(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value < _SEED_LIMIT:
        raise ConfigError(f"{name} must be an integer in [0, 2**64) or null, got {value!r}")
    return int(value)


def _check_stop(name: str, value: Any) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ConfigError(f"{name} must be a non-empty string or a list of non-empty strings, got {value!r}")
    return tuple(items)


def _check_logprobs(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value <= MAX_LOGPROBS:
        raise ConfigError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or null, got {value!r}")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


_VALIDATORS = {
    "max_tokens": _int_at_least(0),
    "temperature": _float_at_least(0.0, low_open=False),
    "top_k": _int_at_least(0),
    "top_p": _float_in(0.0, 1.0, low_open=True, high_open=False),
    "min_p": _float_in(0.0, 1.0, low_open=False, high_open=True),
    "repetition_penalty": _float_at_least(0.0, low_open=True),
    "presence_penalty": _float_in(-2.0, 2.0, low_open=False, high_open=False),
    "frequency_penalty": _float_in(-2.0, 2.0, low_open=False, high_open=False),
    "seed": _check_seed,
    "stop": _check_stop,
    "logprobs": _check_logprobs,
    "ignore_eos": _check_bool,
    "n": _int_in(1, MAX_SAMPLES),
}
