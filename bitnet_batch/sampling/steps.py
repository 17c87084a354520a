"""Sampler steps: small objects that narrow one request's logits down to the token it emits.

A step has ``apply(cands, ctx)`` (edit the working set ``cands`` in place for this token), ``accept(token)``
(update its state with the token the request emitted) and ``reset()`` (back to its state after construction),
like llama.cpp's sampler interface. ``chain.py`` strings steps together and ends them with one selector
(``Greedy`` or ``Categorical``), which has ``select(cands, ctx) -> token`` instead of ``apply``.

The working set (``Candidates``) starts *dense*: a float32 copy of the logits, one entry per token, -inf for a
removed token. Dense steps (penalties, masks) edit it in place. A truncation step (top-k, top-p, min-p) turns it
*reduced*: a short list of candidate ids with float64 logits in the canonical order (logit descending, ties by
ascending id); later steps only drop entries from it. Everything here depends only on the logits, the step
state and the seed, so a request samples the same tokens in any batch and with any thread count.

Large vocabularies (V = 128256) are never fully sorted in the common cases: top-k selects its k best in one
O(V) pass and sorts only those. Top-p and a draw without top-k need the canonical prefix holding a given
probability mass; ``Candidates.dense_window`` finds a short window of the best tokens that holds it (see there),
so only a flat distribution, whose nucleus is itself most of the vocabulary, costs a large sort.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np

from jit_kernels.sampling import canonical_order, exp_weights, mask_disallowed, top_n

from ..errors import BitnetBatchError

FIRST_WINDOW = 256   # tokens in the first top-n window of top-p / categorical draws without top-k
WIDEN = 16           # growth factor of that window when its probability mass is too small
_F32_TINY = float(np.finfo(np.float32).tiny)


class SamplingError(BitnetBatchError):
    """Logits from which no token can be sampled (NaN or +inf logits, every token masked out) or a token id
    outside the vocabulary."""


@dataclass
class StepContext:
    """What one ``sample()`` call passes to every step besides the working set."""

    allowed: np.ndarray | None = None
    """This token's constraint mask (see ``as_allowed_mask``) or None for no mask."""


def top_n_ids(x: np.ndarray, n: int) -> np.ndarray:
    """Ids of the ``n`` largest entries of ``x`` (1-D float, no NaN) in canonical order: value descending, ties
    by ascending id. -inf entries are never returned, so fewer than ``n`` ids come back when fewer are finite.
    One O(V) pass (``jit_kernels.sampling.top_n``); nothing sorts the whole vocabulary unless n is that large."""
    return top_n(np.ascontiguousarray(x), n)


def as_allowed_mask(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """A constraint mask as bool [V] (True = allowed); layouts as in ``checked_mask``."""
    mask = checked_mask(mask, vocab_size)
    if mask.dtype == np.bool_:
        return mask
    return np.unpackbits(mask.view(np.uint8), count=vocab_size, bitorder="little").view(np.bool_)


def without_ids(mask: np.ndarray | None, ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """A bitmask (int32 words [ceil(V/32)], bit j of word i: token 32 i + j) of the tokens ``mask`` allows (None:
    every token; the same layout, not modified) but ``ids``."""
    out = np.full(-(-vocab_size // 32), -1, np.int32) if mask is None else np.array(mask, np.int32)
    ids = np.asarray(ids, np.int64)
    np.bitwise_and.at(out.view(np.uint32), ids >> 5, ~(np.uint32(1) << (ids & 31).astype(np.uint32)))
    return out


def checked_mask(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """A constraint mask checked and brought to bool [V] or uint32 words [ceil(V/32)].

    Accepted layouts: bool [V] (True = allowed); 32-bit words (int32 or uint32) [ceil(V/32)] where bit j of word
    i allows token 32*i + j (llguidance's and XGrammar's bitmask layout); uint8 [ceil(V/8)] where bit j of byte
    i allows token 8*i + j. Bits past V are ignored.
    """
    mask = np.asarray(mask)
    if mask.ndim != 1:
        raise SamplingError(f"constraint mask must be 1-D, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        if mask.size != vocab_size:
            raise SamplingError(f"bool constraint mask must have {vocab_size} entries, got {mask.size}")
        return np.ascontiguousarray(mask)
    if mask.dtype in (np.int32, np.uint32):
        words = -(-vocab_size // 32)
    elif mask.dtype == np.uint8:
        words = -(-vocab_size // 8)
    else:
        raise SamplingError(f"constraint mask must be bool, int32, uint32 or uint8, got {mask.dtype}")
    if mask.size != words:
        raise SamplingError(f"{mask.dtype} constraint bitmask must have {words} entries for {vocab_size} tokens, "
                            f"got {mask.size}")
    if mask.dtype == np.uint8:
        return np.unpackbits(mask, count=vocab_size, bitorder="little").view(np.bool_)
    return np.ascontiguousarray(mask.astype("<u4", copy=False)).view(np.uint32)


class Candidates:
    """The working set of one ``sample()`` call (see the module docstring for the dense and reduced states)."""

    __slots__ = ("dense", "ids", "logits", "_weights")

    def __init__(self, dense: np.ndarray, weights_scratch: np.ndarray):
        self.dense = dense                      # float32 [V] logits after the dense steps, -inf = removed
        self.ids: np.ndarray | None = None      # int64 [n] candidates in canonical order once reduced
        self.logits: np.ndarray | None = None   # float64 [n] their logits, same order
        self._weights = weights_scratch         # float32 [V] scratch for exp(dense - max)

    @property
    def reduced(self) -> bool:
        return self.ids is not None

    # --- dense state ---

    def dense_max(self) -> float:
        """The largest dense logit; raises SamplingError when it is NaN, +inf or -inf (all tokens removed)."""
        m = float(self.dense.max())
        if math.isnan(m):
            raise SamplingError("logits contain NaN")
        if m == math.inf:
            raise SamplingError("logits contain +inf")
        if m == -math.inf:
            raise SamplingError("no token can be sampled: every token is masked out")
        return m

    def dense_weights(self) -> DenseMass:
        """exp(dense - max) into the scratch, with its float64 total and the max (see ``DenseMass``)."""
        top = self.dense_max()
        total = exp_weights(self.dense, top, self._weights)
        return DenseMass(self._weights, total, top)

    def top(self, n: int) -> np.ndarray:
        """Ids of the ``n`` best candidates in canonical order (a prefix of ``ids`` when reduced)."""
        if self.reduced:
            return self.ids[:n]
        self.dense_max()
        return top_n_ids(self.dense, n)

    def dense_window(self, goal: float, mass: DenseMass, strict: bool) -> tuple[np.ndarray, np.ndarray]:
        """A canonical-order prefix of the vocabulary whose cumulative weight reaches ``goal`` (``>`` when
        ``strict``, else ``>=``), and that cumulative weight (float64 [n]). The whole finite vocabulary when
        rounding leaves even that short of the goal.

        Every token more than ``delta = log(V / (total - goal))`` below the max weighs < (total - goal) / V, so
        the tokens within ``delta`` (one cheap count) are guaranteed to hold the goal. That window can be loose
        (a peaked distribution with a long tail), so while it is large, top-n windows of 256, 4096, ... tokens
        (an O(V) selection each) are tried first.
        """
        size = self.dense.size
        slack = mass.total - goal
        # 1.0 logit of margin: the tail left out then weighs < slack / e, so rounding has ~60% of the slack to eat
        floor = np.float32(mass.top - math.log(size / slack) - 1.0) if slack > 0 else np.float32(-np.inf)
        guaranteed = int(np.count_nonzero(self.dense >= floor))
        n = FIRST_WINDOW
        while 4 * n < guaranteed:
            ids = top_n_ids(self.dense, n)
            cdf = np.cumsum(mass.w[ids], dtype=np.float64)
            if _reaches(cdf, goal, strict):
                return ids, cdf
            n *= WIDEN
        ids = np.flatnonzero(self.dense >= floor) if floor > -np.inf else np.flatnonzero(self.dense > -np.inf)
        ids = canonical_order(ids, self.dense[ids])
        cdf = np.cumsum(mass.w[ids], dtype=np.float64)
        if not _reaches(cdf, goal, strict) and ids.size < size:     # rounding ate the slack: take everything
            ids = top_n_ids(self.dense, size)
            cdf = np.cumsum(mass.w[ids], dtype=np.float64)
        return ids, cdf

    def reduce_to(self, ids: np.ndarray, *, canonical: bool = False) -> None:
        """Make the working set these ids (any order unless ``canonical``); -inf ids are dropped."""
        ids = ids[self.dense[ids] > -np.inf]
        if not canonical:
            ids = canonical_order(ids, self.dense[ids])
        self.ids = ids
        self.logits = self.dense[ids].astype(np.float64)

    # --- reduced state ---

    def keep_prefix(self, n: int) -> None:
        """Keep the first ``n`` candidates (n >= 1) of the canonical order."""
        self.ids = self.ids[:n]
        self.logits = self.logits[:n]

    def weights(self) -> np.ndarray:
        """float64 [n] exp(logit - best logit): unnormalised probabilities of the reduced set."""
        return np.exp(self.logits - self.logits[0])


@dataclass(frozen=True)
class DenseMass:
    """The softmax numerators of a dense working set."""

    w: np.ndarray       # float32 [V] exp(dense - top), 0 for removed tokens (a view of the scratch)
    total: float        # sum(w) in float64
    top: float          # the largest dense logit


def _reaches(cdf: np.ndarray, goal: float, strict: bool) -> bool:
    return bool(cdf[-1] > goal) if strict else bool(cdf[-1] >= goal)


def _prefix_reaching(cdf: np.ndarray, goal: float) -> int:
    """Length of the shortest prefix whose cumulative weight is >= goal (all of it if none is)."""
    return min(int(np.searchsorted(cdf, goal, side="left")) + 1, cdf.size)


def _pick(cdf: np.ndarray, goal: float) -> int:
    """Inverse CDF: index of the first entry whose cumulative weight exceeds goal (the last if none does)."""
    return min(int(np.searchsorted(cdf, goal, side="right")), cdf.size - 1)


class MaskSource(Protocol):
    """Something that says which tokens may come next (issue 5 plugs a grammar in here)."""

    def allowed_tokens(self) -> np.ndarray | None: ...   # a mask accepted by as_allowed_mask, or None = all
    def accept(self, token: int) -> None: ...
    def reset(self) -> None: ...


class _Step:
    """Base of the steps: stateless unless overridden. ``dense_only`` steps must run before truncation."""

    dense_only = False

    def accept(self, token: int) -> None:
        pass

    def reset(self) -> None:
        pass


# --- dense steps ---

class Penalties(_Step):
    """Repetition penalty over every token seen (prompt + generated), then presence and frequency penalties
    over the generated tokens only (llama.cpp's order, with ``penalty_last_n`` = everything)."""

    dense_only = True

    def __init__(self, vocab_size: int, repetition: float = 1.0, presence: float = 0.0, frequency: float = 0.0,
                 prompt_ids: Iterable[int] = ()):
        self.vocab_size = vocab_size
        self.repetition = np.float32(repetition)
        self.presence = np.float32(presence)
        self.frequency = np.float32(frequency)
        # the prompt matters only to the repetition penalty; its tokens enter the table with count 0
        prompt = np.asarray(list(prompt_ids) if repetition != 1.0 else [], dtype=np.int64)
        if prompt.size and (prompt.min() < 0 or prompt.max() >= vocab_size):
            bad = int(prompt[(prompt < 0) | (prompt >= vocab_size)][0])
            raise SamplingError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
        self._prompt = np.unique(prompt)
        self.reset()

    def reset(self) -> None:
        n = self._prompt.size
        self._slot = {int(t): i for i, t in enumerate(self._prompt)}   # token id -> row of _ids/_counts
        self._ids = np.zeros(max(64, 2 * n), np.int64)                # [cap] every token seen, first n rows used
        self._ids[:n] = self._prompt
        self._counts = np.zeros(self._ids.size, np.float32)            # [cap] times generated
        self._n = n

    def accept(self, token: int) -> None:
        row = self._slot.get(token)
        if row is None:
            if self._n == self._ids.size:
                self._ids = np.concatenate((self._ids, np.zeros_like(self._ids)))
                self._counts = np.concatenate((self._counts, np.zeros_like(self._counts)))
            row = self._slot[token] = self._n
            self._ids[row] = token
            self._n += 1
        self._counts[row] += 1

    def apply(self, cands: Candidates, ctx: StepContext) -> None:
        if self._n == 0:
            return
        ids = self._ids[: self._n]
        v = cands.dense[ids]                                   # float32 [n]; all arithmetic stays float32
        if self.repetition != 1:
            v = np.where(v > 0, v / self.repetition, v * self.repetition)
        if self.presence or self.frequency:
            counts = self._counts[: self._n]
            v = v - (self.frequency * counts + self.presence * (counts > 0).astype(np.float32))
        cands.dense[ids] = v


class TokenMask(_Step):
    """Removes the tokens a constraint does not allow: the mask passed to this ``sample()`` call
    (``ctx.allowed``) and/or the one its ``source`` (a grammar) gives for this position."""

    dense_only = True

    def __init__(self, vocab_size: int, source: MaskSource | None = None):
        self.vocab_size = vocab_size
        self.source = source

    def apply(self, cands: Candidates, ctx: StepContext) -> None:
        for mask in (ctx.allowed, self.source.allowed_tokens() if self.source is not None else None):
            if mask is not None:
                mask_disallowed(cands.dense, checked_mask(mask, self.vocab_size))

    def accept(self, token: int) -> None:
        if self.source is not None:
            self.source.accept(token)

    def reset(self) -> None:
        if self.source is not None:
            self.source.reset()


class BanTokens(_Step):
    """Never sample these ids (``ignore_eos`` bans the end-of-generation ids)."""

    dense_only = True

    def __init__(self, ids: Iterable[int]):
        self.ids = np.asarray(sorted(set(int(i) for i in ids)), dtype=np.int64)

    def apply(self, cands: Candidates, ctx: StepContext) -> None:
        cands.dense[self.ids] = -np.inf


# --- steps that work in either state ---

class Temperature(_Step):
    """Divides the logits by ``t`` > 0, after shifting the best one to 0 (softmax does not change). The shift
    keeps a tiny t from overflowing to +inf or NaN: the other logits go to -inf at worst, which makes the draw
    an argmax. Dividing keeps the order, so this step commutes with top-k."""

    def __init__(self, t: float):
        if not t > 0:
            raise SamplingError(f"temperature step needs t > 0, got {t}")
        self.t = t

    def apply(self, cands: Candidates, ctx: StepContext) -> None:
        if cands.reduced:
            cands.logits = (cands.logits - cands.logits[0]) / self.t      # canonical: logits[0] is the best
        else:
            np.subtract(cands.dense, np.float32(cands.dense_max()), out=cands.dense)
            # a t below float32's smallest normal would round to 0 and turn the best logit's 0/t into NaN
            np.divide(cands.dense, np.float32(max(self.t, _F32_TINY)), out=cands.dense)


class TopK(_Step):
    """Keeps exactly the ``k`` best tokens (fewer if fewer remain); ties at the k-th go to the lowest ids."""

    def __init__(self, k: int):
        self.k = k

    def apply(self, cands: Candidates, ctx: StepContext) -> None:
        if cands.reduced:
            cands.keep_prefix(self.k)
        else:
            cands.reduce_to(cands.top(self.k), canonical=True)


class TopP(_Step):
    """Keeps the smallest canonical-order prefix whose probability mass is >= ``p``. Probabilities are those of
    the current set (after top-k they are renormalised over the k survivors, as in HF and vLLM)."""

    def __init__(self, p: float):
        self.p = p

    def apply(self, cands: Candidates, ctx: StepContext) -> None:
        if cands.reduced:
            cdf = np.cumsum(cands.weights())
            cands.keep_prefix(_prefix_reaching(cdf, self.p * cdf[-1]))
            return
        mass = cands.dense_weights()
        ids, cdf = cands.dense_window(self.p * mass.total, mass, strict=False)
        n = _prefix_reaching(cdf, self.p * mass.total)
        cands.reduce_to(ids[:n], canonical=True)


class MinP(_Step):
    """Keeps the tokens whose probability is >= ``p`` times the best token's (a ratio any truncation keeps)."""

    def __init__(self, p: float):
        self.p = p

    def apply(self, cands: Candidates, ctx: StepContext) -> None:
        if not cands.reduced:
            floor = cands.dense_max() + math.log(self.p)
            # a float32 pre-filter a hair below the floor; the exact float64 test below decides
            margin = 1e-3 * (1.0 + abs(floor))
            cands.reduce_to(np.flatnonzero(cands.dense >= np.float32(floor - margin)))
        cands.keep_prefix(int(np.count_nonzero(cands.weights() >= self.p)))


# --- selectors ---

class Greedy(_Step):
    """Argmax; ties go to the lowest id. Draws nothing from any RNG."""

    def select(self, cands: Candidates, ctx: StepContext) -> int:
        if cands.reduced:
            return int(cands.ids[0])
        best = int(np.argmax(cands.dense))          # first maximum = lowest id
        if not math.isfinite(float(cands.dense[best])):
            cands.dense_max()                       # raises the matching SamplingError
        return best


class Categorical(_Step):
    """A draw from the softmax of the candidates: ONE uniform per token from its own PCG64 generator, mapped
    through the inverse CDF of the candidates in canonical order, so the token depends only on (logits, state,
    seed)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.rng = np.random.Generator(np.random.PCG64(self.seed))

    def select(self, cands: Candidates, ctx: StepContext) -> int:
        u = float(self.rng.random())                 # [0, 1), drawn before anything can fail
        if cands.reduced:
            cdf = np.cumsum(cands.weights())
            return int(cands.ids[_pick(cdf, u * cdf[-1])])
        mass = cands.dense_weights()
        ids, cdf = cands.dense_window(u * mass.total, mass, strict=True)
        return int(ids[_pick(cdf, u * mass.total)])


class Step(Protocol):
    """The interface every step of a chain implements."""

    dense_only: bool

    def apply(self, cands: Candidates, ctx: StepContext) -> None: ...
    def accept(self, token: int) -> None: ...
    def reset(self) -> None: ...


class Selector(Protocol):
    """The last link of a chain: picks the token."""

    def select(self, cands: Candidates, ctx: StepContext) -> int: ...
    def accept(self, token: int) -> None: ...
    def reset(self) -> None: ...


__all__: Sequence[str] = (
    "SamplingError", "StepContext", "Candidates", "DenseMass", "MaskSource", "Step", "Selector", "top_n_ids",
    "as_allowed_mask", "checked_mask", "Penalties", "TokenMask", "BanTokens", "Temperature", "TopK", "TopP", "MinP",
    "Greedy", "Categorical",
)
