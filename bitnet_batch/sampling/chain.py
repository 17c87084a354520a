"""The per-request sampler: a chain of steps plus one selector, built from ``SamplingParams``.

Chain order (``build_chain``), equivalent to HF / vLLM's "temperature first" order::

    penalties -> constraint mask -> banned ids (ignore_eos) -> top-k -> temperature -> top-p -> min-p -> draw

Top-k runs before temperature only because it is cheaper to divide k logits than V; dividing by t > 0 keeps
the order, so the kept set is the one temperature-then-top-k gives. Greedy (temperature 0) stops after the
masks: argmax, no RNG draw (top-k/top-p/min-p always keep the argmax anyway).

Usage, per request::

    sampler = make_sampler(params, seed, vocab_size, eog_ids, prompt_ids)
    token = sampler.sample(logits)      # logits: [V] floats, left untouched
    sampler.accept(token)               # records the token (penalty and grammar state)

The scratch buffers (two float32 [V]) live in a ``SamplingWorkspace`` shared by all samplers of one thread:
a sampler keeps no state in them between calls, so hundreds of in-flight requests cost no extra memory.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Iterable, Sequence

import numpy as np

from jit_kernels.sampling import exp_weights

from ..errors import ConfigError
from .params import SamplingParams
from .steps import (BanTokens, Candidates, Categorical, Greedy, MaskSource, MinP, Penalties, SamplingError,
                    Selector, Step, StepContext, Temperature, TokenMask, TopK, TopP, top_n_ids)


class SamplingWorkspace:
    """Scratch of ``sample()`` calls for one vocabulary size; one per thread (see ``thread_workspace``)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.dense = np.empty(vocab_size, np.float32)     # [V] the call's logits after the dense steps
        self.weights = np.empty(vocab_size, np.float32)   # [V] exp(dense - max)


_local = threading.local()


def thread_workspace(vocab_size: int) -> SamplingWorkspace:
    """The calling thread's workspace for ``vocab_size`` (created on first use)."""
    spaces = getattr(_local, "spaces", None)
    if spaces is None:
        spaces = _local.spaces = {}
    if vocab_size not in spaces:
        spaces[vocab_size] = SamplingWorkspace(vocab_size)
    return spaces[vocab_size]


class SamplerChain:
    """Steps applied in order, then the selector. Like a step, it has ``accept`` and ``reset``."""

    def __init__(self, steps: Sequence[Step], selector: Selector):
        truncating = [s for s in steps if not s.dense_only]
        if truncating:
            first = steps.index(truncating[0])
            late = [type(s).__name__ for s in steps[first:] if s.dense_only]
            if late:
                raise ConfigError(f"sampler steps {', '.join(late)} work on the full vocabulary and must come "
                                  f"before {type(truncating[0]).__name__}")
        self.steps = tuple(steps)
        self.selector = selector

    def run(self, cands: Candidates, ctx: StepContext) -> int:
        for step in self.steps:
            step.apply(cands, ctx)
        return self.selector.select(cands, ctx)

    def accept(self, token: int) -> None:
        for step in self.steps:
            step.accept(token)
        self.selector.accept(token)

    def reset(self) -> None:
        for step in self.steps:
            step.reset()
        self.selector.reset()


def build_chain(params: SamplingParams, seed: int, vocab_size: int, eog_ids: Iterable[int] = (),
                prompt_ids: Iterable[int] = (), constraint: MaskSource | None = None) -> SamplerChain:
    """The chain for ``params`` (order in the module docstring); steps that would do nothing are left out."""
    steps: list[Step] = []
    p = params
    if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
        steps.append(Penalties(vocab_size, p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
                               prompt_ids))
    steps.append(TokenMask(vocab_size, constraint))
    eog = [i for i in eog_ids if 0 <= i < vocab_size]
    if p.ignore_eos and eog:
        steps.append(BanTokens(eog))
    if p.greedy:
        return SamplerChain(steps, Greedy())
    if 0 < p.top_k < vocab_size:
        steps.append(TopK(p.top_k))
    if p.temperature != 1.0:
        steps.append(Temperature(p.temperature))
    if p.top_p < 1.0:
        steps.append(TopP(p.top_p))
    if p.min_p > 0.0:
        steps.append(MinP(p.min_p))
    return SamplerChain(steps, Categorical(seed))


class Sampler:
    """One request's sampler: owns its RNG (PCG64 seeded with ``seed``) and its penalty / grammar state."""

    def __init__(self, params: SamplingParams, seed: int, vocab_size: int, eog_ids: frozenset[int] = frozenset(),
                 prompt_ids: Sequence[int] = (), *, constraint: MaskSource | None = None,
                 workspace: SamplingWorkspace | None = None):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"sampler seed must be an integer >= 0, got {seed!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
            raise ConfigError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        if workspace is not None and workspace.vocab_size != vocab_size:
            raise ConfigError(f"workspace is for {workspace.vocab_size} tokens, sampler for {vocab_size}")
        self.params = params
        self.seed = int(seed)
        self.vocab_size = int(vocab_size)
        self.eog_ids = frozenset(int(i) for i in eog_ids)
        self._workspace = workspace
        self.chain = build_chain(params, self.seed, self.vocab_size, self.eog_ids, prompt_ids, constraint)

    def sample(self, logits: np.ndarray, *, allowed: np.ndarray | None = None) -> int:
        """The next token for these logits (float [V], not modified). ``allowed``: an optional constraint mask
        for this position (layouts in ``steps.as_allowed_mask``). Does not record the token: call ``accept``."""
        logits = self._check_logits(logits)
        ws = self._workspace or thread_workspace(self.vocab_size)
        np.copyto(ws.dense, logits, casting="same_kind")
        return self.chain.run(Candidates(ws.dense, ws.weights), StepContext(allowed))

    @functools.cached_property
    def banned_ids(self) -> tuple[int, ...]:
        """The ids this sampler never picks whatever the logits (``ignore_eos``: the end-of-generation ids), sorted
        (read once: the chain is fixed, and the job asks for every row of every step)."""
        for step in self.chain.steps:
            if isinstance(step, BanTokens):
                return tuple(int(i) for i in step.ids)
        return ()

    def accept(self, token: int) -> None:
        """Record a generated token: penalty counts, grammar state."""
        self._check_token(token)
        self.chain.accept(int(token))

    def reset(self) -> None:
        """Back to the state after construction: prompt-only penalty state, RNG at the seed, grammar at start."""
        self.chain.reset()

    def top_logprobs(self, logits: np.ndarray, token: int, n: int | None = None
                     ) -> tuple[float, list[tuple[int, float]]]:
        """``token_logprobs(logits, token, n)`` with ``n`` defaulting to ``params.logprobs`` (0 when None)."""
        if n is None:
            n = self.params.logprobs or 0
        return token_logprobs(self._check_logits(logits), token, n)

    def _check_logits(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.shape != (self.vocab_size,) or logits.dtype.kind != "f":
            raise SamplingError(f"logits must be a float array of shape ({self.vocab_size},), "
                                f"got {logits.dtype} {logits.shape}")
        return logits

    def _check_token(self, token: int) -> None:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < self.vocab_size:
            raise SamplingError(f"token id {token!r} is outside the vocabulary [0, {self.vocab_size})")


def make_sampler(params: SamplingParams, seed: int, vocab_size: int, eog_ids: frozenset[int] = frozenset(),
                 prompt_ids: Sequence[int] = (), *, constraint: MaskSource | None = None,
                 workspace: SamplingWorkspace | None = None) -> Sampler:
    """A ``Sampler`` for one request (mlx-lm's name for the factory)."""
    return Sampler(params, seed, vocab_size, eog_ids, prompt_ids, constraint=constraint, workspace=workspace)


def token_logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-softmax of the RAW model logits (before penalties and temperature, vLLM's default): the logprob of
    ``token`` and the ``n`` best (id, logprob) pairs, best first, ties by ascending id.

    exp runs in the logits' own dtype (float32: ``exp_weights``, vectorised), the sum and the logs in float64;
    the result is within ~1e-6 of a float64 log-softmax."""
    x = np.ascontiguousarray(logits)                    # [V], not copied when already contiguous
    if x.ndim != 1 or x.dtype.kind != "f":
        raise SamplingError(f"logits must be a 1-D float array, got {x.dtype} {x.shape}")
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < x.size:
        raise SamplingError(f"token id {token!r} is outside the vocabulary [0, {x.size})")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise SamplingError(f"number of top logprobs must be an integer >= 0, got {n!r}")
    m = x.max()
    if not math.isfinite(float(m)):
        raise SamplingError(f"logits contain non-finite values (max {float(m)})")
    if x.dtype == np.float32:
        total = exp_weights(x, m, np.empty_like(x))
    else:
        total = float(np.exp(x - m).sum(dtype=np.float64))
    log_norm = float(m) + math.log(total)
    top = top_n_ids(x, int(n))
    return float(x[token]) - log_norm, [(int(i), float(x[i]) - log_norm) for i in top]
