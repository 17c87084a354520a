"""Sampling: parameters, each step on hand-made 4-5 token tables, selectors, the chain on a full vocabulary
against a float64 reference, logprobs, and the compiled helpers against naive twins."""
import dataclasses
import math

import numpy as np
import pytest

from bitnet_batch.errors import ConfigError
from bitnet_batch.sampling import (SamplingParams, SamplingWorkspace, SamplingError, StopMatcher,
                                   as_allowed_mask, derive_seed, make_sampler, resolve_seed, token_logprobs)
from bitnet_batch.sampling.chain import SamplerChain
from bitnet_batch.sampling.steps import (BanTokens, Candidates, Greedy, MinP, Penalties,
                                         StepContext, Temperature, TokenMask, TopK, TopP, without_ids)
from jit_kernels import sampling as ks

# a 5-token table; canonical order (prob descending): 1 (0.4), 3 (0.25), 2 (0.2), 0 (0.1), 4 (0.05)
P5 = np.array([0.1, 0.4, 0.2, 0.25, 0.05])
L5 = np.log(P5).astype(np.float32)
CTX = StepContext()


def cands(logits):
    dense = np.array(logits, np.float32)
    return Candidates(dense, np.empty_like(dense))


def ids_of(c):
    return [int(i) for i in c.ids]


# ---------------------------------------------------------------- params

def test_defaults_are_greedy_and_frozen():
    p = SamplingParams()
    assert p.greedy and p.max_tokens == 256 and p.stop == () and p.logprobs is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0


@pytest.mark.parametrize("field,value,message", [
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
    ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
    ("max_tokens", -3, "max_tokens must be an integer >= 0, got -3"),
    ("max_tokens", True, "max_tokens must be an integer >= 0, got True"),
    ("max_tokens", 3.0, "max_tokens must be an integer >= 0, got 3.0"),
    ("top_k", -1, "top_k must be an integer >= 0, got -1"),
    ("temperature", -0.5, "temperature must be a number >= 0, got -0.5"),
    ("temperature", float("nan"), "temperature must be a number >= 0, got nan"),
    ("temperature", "hot", "temperature must be a number >= 0, got 'hot'"),
    ("min_p", 1.0, "min_p must be in [0, 1), got 1.0"),
    ("repetition_penalty", 0.0, "repetition_penalty must be a number > 0, got 0.0"),
    ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2], got 2.5"),
    ("frequency_penalty", -3, "frequency_penalty must be in [-2, 2], got -3"),
    ("seed", -1, "seed must be an integer in [0, 2**64) or null, got -1"),
    ("seed", 2 ** 64, "seed must be an integer in [0, 2**64) or null"),
    ("stop", ("ok", ""), "stop must be a non-empty string or a list of non-empty strings"),
    ("stop", [1], "stop must be a non-empty string or a list of non-empty strings, got [1]"),
    ("logprobs", 21, "logprobs must be an integer in [0, 20] or null, got 21"),
    ("logprobs", True, "logprobs must be an integer in [0, 20] or null, got True"),
    ("ignore_eos", 1, "ignore_eos must be true or false, got 1"),
])
def test_validation_names_field_range_and_value(field, value, message):
    with pytest.raises(ConfigError) as e:
        SamplingParams(**{field: value})
    assert message in str(e.value)


def test_values_are_normalised():
    p = SamplingParams(temperature=1, top_p=1, stop=["a", "b"], seed=5, logprobs=0)
    assert isinstance(p.temperature, float) and p.temperature == 1.0 and not p.greedy
    assert p.stop == ("a", "b") and p.seed == 5 and p.logprobs == 0
    assert SamplingParams(stop="###").stop == ("###",)


def test_from_overrides_good_values():
    base = SamplingParams(max_tokens=64, top_k=10, seed=3)
    p = SamplingParams.from_overrides(base, {"temperature": 1, "top_p": 0.9, "stop": "\n\n", "seed": None,
                                             "logprobs": 5, "not_a_field": "ignored"})
    assert (p.temperature, p.top_p, p.stop, p.seed, p.logprobs) == (1.0, 0.9, ("\n\n",), None, 5)
    assert (p.max_tokens, p.top_k) == (64, 10)                   # untouched fields come from the base
    assert base.temperature == 0.0 and base.seed == 3           # the base is not changed
    assert SamplingParams.from_overrides(base, {"stop": ["a", "b"]}).stop == ("a", "b")
    assert SamplingParams.from_overrides(base, {}) == base


@pytest.mark.parametrize("overrides,message", [
    ({"max_tokens": -3}, "max_tokens must be an integer >= 0, got -3"),
    ({"max_tokens": True}, "max_tokens must be an integer >= 0, got True"),
    ({"top_k": "40"}, "top_k must be an integer >= 0, got '40'"),
    ({"temperature": None}, "temperature must be a number >= 0, got None"),
    ({"stop": [["x"]]}, "stop must be a non-empty string or a list of non-empty strings"),
    ({"ignore_eos": "yes"}, "ignore_eos must be true or false, got 'yes'"),
])
def test_from_overrides_bad_values(overrides, message):
    with pytest.raises(ConfigError) as e:
        SamplingParams.from_overrides(SamplingParams(), overrides)
    assert message in str(e.value)


def test_from_overrides_needs_a_mapping():
    with pytest.raises(ConfigError, match="must be an object"):
        SamplingParams.from_overrides(SamplingParams(), ["temperature", 1])


def test_derive_seed_is_stable_and_type_aware():
    # computed once; any change breaks the reproducibility of every earlier job
    assert derive_seed(1234, "req-1") == 8268448758008314367
    assert derive_seed(1234, 1) == 17447223967573123263
    assert derive_seed(1234, "1") == 13590751461025354112
    assert derive_seed(1234, 1) != derive_seed(1234, "1")
    assert derive_seed(1235, "req-1") != derive_seed(1234, "req-1")
    assert 0 <= derive_seed(0, 0) < 2 ** 64
    with pytest.raises(ConfigError):
        derive_seed(1, True)
    with pytest.raises(ConfigError):
        derive_seed(1, 1.5)


def test_resolve_seed_prefers_the_request_seed():
    assert resolve_seed(SamplingParams(seed=9), 1234, "a") == 9
    assert resolve_seed(SamplingParams(), 1234, "a") == derive_seed(1234, "a")


# ---------------------------------------------------------------- steps on tiny tables

def test_temperature_scales_dense_and_reduced():
    # the best logit is shifted to 0 first (softmax is unchanged), then everything is divided by t
    c = cands([1.0, 2.0, 3.0, -1.0, 0.0])
    Temperature(0.5).apply(c, CTX)
    assert c.dense.tolist() == [-4.0, -2.0, 0.0, -8.0, -6.0]
    c = cands([1.0, 2.0, 3.0, -1.0, 0.0])
    TopK(2).apply(c, CTX)
    Temperature(4.0).apply(c, CTX)
    assert ids_of(c) == [2, 1] and c.logits.tolist() == [0.0, -0.25]


@pytest.mark.parametrize("top_k", [0, 3])
def test_tiny_temperature_is_an_argmax_not_a_nan(top_k):
    s = make_sampler(SamplingParams(temperature=1e-300, top_k=top_k), 1, 5)
    assert [s.sample(L5) for _ in range(20)] == [1] * 20


def test_top_k_keeps_exactly_k_with_ties_to_lowest_id():
    logits = [1.0, 3.0, 3.0, 2.0, 0.0]
    for k, expected in [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (5, [1, 2, 3, 0, 4]), (9, [1, 2, 3, 0, 4])]:
        c = cands(logits)
        TopK(k).apply(c, CTX)
        assert ids_of(c) == expected
        assert c.logits.tolist() == [logits[i] for i in expected]
    c = cands([3.0, 1.0, 1.0, 1.0, 0.0])                        # three-way tie across the cut
    TopK(2).apply(c, CTX)
    assert ids_of(c) == [0, 1]
    c = cands([1.0, -np.inf, 2.0, -np.inf, 0.0])                 # masked tokens never come back
    TopK(4).apply(c, CTX)
    assert ids_of(c) == [2, 0, 4]
    c = cands(L5)
    MinP(0.2).apply(c, CTX)                                     # top-k on an already reduced set
    TopK(2).apply(c, CTX)
    assert ids_of(c) == [1, 3]


@pytest.mark.parametrize("p,expected", [(0.3, [1]), (0.6, [1, 3]), (0.7, [1, 3, 2]), (0.99, [1, 3, 2, 0, 4])])
def test_top_p_keeps_smallest_prefix_reaching_p(p, expected):
    c = cands(L5)
    TopP(p).apply(c, CTX)
    assert ids_of(c) == expected


def test_top_p_after_top_k_uses_renormalised_mass():
    # over {1, 3, 2} the probabilities are 0.47, 0.29, 0.24: 0.7 is reached with two tokens, not three
    c = cands(L5)
    TopK(3).apply(c, CTX)
    TopP(0.7).apply(c, CTX)
    assert ids_of(c) == [1, 3]


@pytest.mark.parametrize("min_p,expected", [(0.2, [1, 3, 2, 0]), (0.3, [1, 3, 2]), (0.6, [1, 3]), (0.9, [1])])
def test_min_p_is_relative_to_the_best_token(min_p, expected):
    c = cands(L5)
    MinP(min_p).apply(c, CTX)                                   # from the dense state
    assert ids_of(c) == expected
    c = cands(L5)
    TopK(5).apply(c, CTX)
    MinP(min_p).apply(c, CTX)                                   # from a reduced set
    assert ids_of(c) == expected


def test_penalties_exact_values_and_reset():
    logits = [2.0, -1.0, 0.5, 3.0, 0.0]
    step = Penalties(5, repetition=2.0, presence=0.5, frequency=0.25, prompt_ids=[0, 1])
    for t in (2, 2, 3):
        step.accept(t)
    c = cands(logits)
    step.apply(c, CTX)
    # 0, 1: prompt only -> repetition only (2/2, -1*2); 2: generated twice -> 0.5/2 - (2*0.25 + 0.5);
    # 3: once -> 3/2 - (0.25 + 0.5); 4: unseen
    assert c.dense.tolist() == [1.0, -2.0, -0.75, 0.75, 0.0]
    step.reset()
    c = cands(logits)
    step.apply(c, CTX)
    assert c.dense.tolist() == [1.0, -2.0, 0.5, 3.0, 0.0]


def test_presence_and_frequency_ignore_the_prompt():
    step = Penalties(5, presence=1.0, frequency=0.5, prompt_ids=[0, 4])
    step.accept(4)
    c = cands([1.0, 1.0, 1.0, 1.0, 1.0])
    step.apply(c, CTX)
    assert c.dense.tolist() == [1.0, 1.0, 1.0, 1.0, -0.5]


def test_penalty_table_grows_past_its_first_capacity():
    step = Penalties(300, frequency=1.0)
    for t in range(0, 300, 2):                                  # 150 distinct tokens, more than 64 rows
        step.accept(t)
    step.accept(10)
    c = cands(np.zeros(300))
    step.apply(c, CTX)
    expected = np.where(np.arange(300) % 2 == 0, -1.0, 0.0)
    expected[10] = -2.0
    assert np.array_equal(c.dense, expected.astype(np.float32))


def test_mask_layouts_agree():
    allowed = np.array([True, False, True, False, True] + [False] * 30 + [True] * 5)    # V = 40
    words = np.zeros(2, np.uint32)
    for i in np.flatnonzero(allowed):
        words[i // 32] |= np.uint32(1 << (i % 32))
    assert words[0] == 0b10101 and words[1] == 0b11111000
    packed8 = np.packbits(allowed, bitorder="little")
    for mask in (allowed, words, words.view(np.int32), packed8):
        assert np.array_equal(as_allowed_mask(mask, 40), allowed)
        c = cands(np.arange(40, dtype=np.float32))
        TokenMask(40).apply(c, StepContext(allowed=mask))
        assert np.array_equal(c.dense > -np.inf, allowed)
        assert np.array_equal(c.dense[allowed], np.flatnonzero(allowed).astype(np.float32))


@pytest.mark.parametrize("bad", [np.ones(39, bool), np.ones(3, np.uint32), np.ones(4, np.uint8),
                                 np.ones(40, np.float32), np.ones((2, 20), bool)])
def test_bad_masks_are_rejected(bad):
    with pytest.raises(SamplingError, match="mask"):
        TokenMask(40).apply(cands(np.zeros(40)), StepContext(allowed=bad))


class OnlyNext:
    """A fake grammar: allows exactly the next token of a fixed sequence."""

    def __init__(self, seq, vocab):
        self.seq, self.vocab, self.pos = seq, vocab, 0

    def allowed_tokens(self):
        m = np.zeros(self.vocab, bool)
        m[self.seq[self.pos]] = True
        return m

    def accept(self, token):
        assert token == self.seq[self.pos]
        self.pos += 1

    def reset(self):
        self.pos = 0


def test_mask_source_drives_the_sampler_and_follows_accept_and_reset():
    src = OnlyNext([3, 0, 4], 5)
    s = make_sampler(SamplingParams(temperature=1.0), 11, 5, constraint=src)
    logits = np.array([0.0, 5.0, 0.0, 0.0, 0.0], np.float32)   # token 1 would win without the grammar
    out = []
    for _ in range(3):
        out.append(s.sample(logits))
        s.accept(out[-1])
    assert out == [3, 0, 4]
    s.reset()
    assert src.pos == 0 and s.sample(logits) == 3


def test_greedy_ties_go_to_lowest_id_and_draw_nothing():
    s = make_sampler(SamplingParams(), 5, 4)
    assert isinstance(s.chain.selector, Greedy)
    assert s.sample(np.array([1.0, 5.0, 5.0, 2.0], np.float32)) == 1
    c = cands([0.0, 2.0, 2.0, 1.0])
    TopK(3).apply(c, CTX)
    assert Greedy().select(c, CTX) == 1


def test_greedy_sees_penalties_and_masks():
    logits = np.array([3.0, 2.9, 0.0, 1.0], np.float32)
    assert make_sampler(SamplingParams(), 0, 4).sample(logits) == 0
    s = make_sampler(SamplingParams(repetition_penalty=1.5), 0, 4, prompt_ids=[0])
    assert s.sample(logits) == 1                                 # 3.0 / 1.5 = 2.0 < 2.9
    assert make_sampler(SamplingParams(), 0, 4).sample(logits, allowed=np.array([0, 0, 1, 1], bool)) == 3


def test_ignore_eos_masks_end_of_generation_ids():
    logits = np.array([0.0, 1.0, 0.5, 4.0, 3.0], np.float32)
    assert make_sampler(SamplingParams(), 0, 5, eog_ids=frozenset({3})).sample(logits) == 3
    s = make_sampler(SamplingParams(ignore_eos=True), 0, 5, eog_ids=frozenset({3}))
    assert s.sample(logits) == 4
    s = make_sampler(SamplingParams(ignore_eos=True, temperature=1.0), 0, 5, eog_ids=frozenset({3, 4, 9}))
    assert all(s.sample(logits) not in (3, 4) for _ in range(300))
    assert s.banned_ids == (3, 4) and make_sampler(SamplingParams(), 0, 5, eog_ids=frozenset({3})).banned_ids == ()
    # the ids as a mask (what the argmax lm_head takes): every other token, or those another mask allows
    V = 70
    assert np.flatnonzero(~as_allowed_mask(without_ids(None, [0, 31, 63, 69], V), V)).tolist() == [0, 31, 63, 69]
    other = np.full(3, -1, np.int32)
    other[1] = 0                                                  # tokens 32-63 not allowed
    banned = without_ids(other, [5, 40], V)
    assert np.flatnonzero(~as_allowed_mask(banned, V)).tolist() == [5] + list(range(32, 64))
    assert other[0] == -1 and banned.dtype == np.int32


def test_unsampleable_logits_raise():
    s = make_sampler(SamplingParams(), 0, 3)
    with pytest.raises(SamplingError, match="NaN"):
        s.sample(np.array([0.0, np.nan, 1.0], np.float32))
    with pytest.raises(SamplingError, match="masked out"):
        s.sample(np.zeros(3, np.float32), allowed=np.zeros(3, bool))
    t = make_sampler(SamplingParams(temperature=1.0, top_k=2), 0, 3)
    with pytest.raises(SamplingError, match="masked out"):
        t.sample(np.zeros(3, np.float32), allowed=np.zeros(3, bool))
    with pytest.raises(SamplingError, match="shape"):
        s.sample(np.zeros(4, np.float32))
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        s.accept(3)


def test_chain_rejects_full_vocabulary_steps_after_truncation():
    with pytest.raises(ConfigError, match="BanTokens"):
        SamplerChain([TopK(2), BanTokens([0])], Greedy())


def test_sample_leaves_the_callers_logits_alone():
    logits = (np.arange(50, dtype=np.float32) % 7) - 3
    before = logits.copy()
    p = SamplingParams(temperature=0.7, top_k=10, top_p=0.9, repetition_penalty=1.3, frequency_penalty=0.5)
    s = make_sampler(p, 1, 50, prompt_ids=[1, 2])
    s.accept(s.sample(logits, allowed=np.arange(50) % 3 != 0))
    assert np.array_equal(logits, before)


# ---------------------------------------------------------------- the categorical selector

def chi_square(tokens, probs):
    counts = np.bincount(tokens, minlength=len(probs))
    expected = len(tokens) * np.asarray(probs)
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_P001 = {2: 13.82, 4: 18.47}      # chi-square critical values at p = 0.001 by degrees of freedom


@pytest.mark.parametrize("params,probs", [
    (SamplingParams(temperature=1.0), P5),
    (SamplingParams(temperature=0.5), P5 ** 2 / (P5 ** 2).sum()),
    (SamplingParams(temperature=1.0, top_k=3), np.where(np.arange(5) % 4 == 0, 0, P5) / 0.85),
])
def test_empirical_frequencies_match(params, probs):
    s = make_sampler(params, 2024, 5)
    tokens = np.array([s.sample(L5) for _ in range(20000)])
    support = np.flatnonzero(probs > 0)
    assert set(np.unique(tokens).tolist()) == set(support.tolist())     # truncated tokens are never drawn
    dense_ids = np.searchsorted(support, tokens)                         # chi-square over the support only
    assert chi_square(dense_ids, probs[support]) < CHI2_P001[support.size - 1]
    # and the test can fail: the same draws are far from a uniform distribution
    assert chi_square(tokens, np.full(5, 0.2)) > 1000


def naive_dist(logits, p):
    """float64 reference of the chain: (ids in canonical order, normalised probabilities)."""
    x = np.asarray(logits, np.float64)
    order = np.lexsort((np.arange(x.size), -x))
    order = order[np.isfinite(x[order])]
    if 0 < p.top_k < x.size:
        order = order[: p.top_k]
    z = x[order] / p.temperature
    prob = np.exp(z - z[0])
    prob /= prob.sum()
    if p.top_p < 1:
        n = int(np.searchsorted(np.cumsum(prob), p.top_p, side="left")) + 1
        order, prob = order[:n], prob[:n] / prob[:n].sum()
    if p.min_p > 0:
        keep = prob >= p.min_p * prob[0]
        order, prob = order[keep], prob[keep] / prob[keep].sum()
    return order, prob


def naive_draw(order, prob, u):
    return int(order[min(int(np.searchsorted(np.cumsum(prob), u, side="right")), order.size - 1)])


def test_one_uniform_per_token_through_the_canonical_inverse_cdf():
    s = make_sampler(SamplingParams(temperature=1.0), 77, 5)
    us = np.random.Generator(np.random.PCG64(77)).random(300)
    order, prob = naive_dist(L5, s.params)
    assert [s.sample(L5) for _ in range(300)] == [naive_draw(order, prob, u) for u in us]


def test_same_seed_same_tokens_other_seed_other_tokens_reset_replays():
    p = SamplingParams(temperature=1.0)
    a = [make_sampler(p, 1, 5).sample(L5) for _ in range(1)]
    s1, s2, s3 = make_sampler(p, 1, 5), make_sampler(p, 1, 5), make_sampler(p, 2, 5)
    seq1 = [s1.sample(L5) for _ in range(64)]
    assert seq1 == [s2.sample(L5) for _ in range(64)]
    assert seq1 != [s3.sample(L5) for _ in range(64)]
    assert seq1[0] == a[0]
    s1.reset()
    assert [s1.sample(L5) for _ in range(64)] == seq1


V_BIG = 128256


@pytest.fixture(scope="module")
def big_logits():
    rng = np.random.default_rng(5)
    flat = rng.standard_normal(V_BIG).astype(np.float32)          # mass spread over the whole vocabulary
    peaked = flat * 2
    peaked[rng.integers(0, V_BIG, 30)] += 12                       # a few strong candidates, like an LM
    peaked[:20] = peaked[20]                                        # and a run of exact ties
    return {"flat": flat, "peaked": peaked}


@pytest.mark.parametrize("kind,params", [
    ("flat", SamplingParams(temperature=1.0)),                     # the draw window widens to the whole vocab
    ("flat", SamplingParams(temperature=0.8, top_p=0.5)),          # a nucleus of tens of thousands
    ("peaked", SamplingParams(temperature=0.7, top_k=40, top_p=0.9)),
    ("peaked", SamplingParams(temperature=1.3, top_p=0.95, min_p=0.01)),
    ("peaked", SamplingParams(temperature=0.9, min_p=0.05)),
])
def test_full_vocabulary_chain_matches_float64_reference(big_logits, kind, params):
    logits = big_logits[kind]
    order, prob = naive_dist(logits, params)
    seed = 31
    us = np.random.Generator(np.random.PCG64(seed)).random(12)
    s = make_sampler(params, seed, V_BIG)
    assert [s.sample(logits) for _ in us] == [naive_draw(order, prob, u) for u in us]


def test_dense_window_with_an_unreachable_goal_is_every_finite_token():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(1000).astype(np.float32)
    x[rng.choice(1000, 10, replace=False)] = -np.inf
    c = cands(x)
    mass = c.dense_weights()
    ids, cdf = c.dense_window(mass.total * 1.5, mass, strict=True)
    assert np.array_equal(ids, naive_top_n(x, 1000)) and ids.size == 990
    assert cdf[-1] == pytest.approx(mass.total, rel=1e-9)


def test_bad_arguments_raise_typed_errors():
    p = SamplingParams()
    with pytest.raises(ConfigError, match="seed"):
        make_sampler(p, -1, 5)
    with pytest.raises(ConfigError, match="vocab_size"):
        make_sampler(p, 0, 0)
    with pytest.raises(ConfigError, match="workspace"):
        make_sampler(p, 0, 5, workspace=SamplingWorkspace(6))
    with pytest.raises(SamplingError, match="prompt token id 9"):
        make_sampler(SamplingParams(repetition_penalty=1.2), 0, 5, prompt_ids=[1, 9])
    with pytest.raises(SamplingError, match="token id 5"):
        token_logprobs(L5, 5, 1)
    with pytest.raises(SamplingError, match="top logprobs"):
        token_logprobs(L5, 0, -1)
    with pytest.raises(SamplingError, match="non-finite"):
        token_logprobs(np.array([0.0, np.nan], np.float32), 0, 1)
    with pytest.raises(SamplingError, match="1-D float"):
        token_logprobs(np.zeros(3, np.int32), 0, 1)


def test_result_does_not_depend_on_batch_position_or_workspace(big_logits):
    p = SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.2)
    batch = np.stack([big_logits["peaked"], big_logits["flat"], big_logits["peaked"][::-1]])
    alone = make_sampler(p, 3, V_BIG, prompt_ids=[7, 8], workspace=SamplingWorkspace(V_BIG))
    in_batch = make_sampler(p, 3, V_BIG, prompt_ids=[7, 8])
    other = make_sampler(p, 4, V_BIG)                              # shares the thread workspace
    for row in range(3):
        for _ in range(3):
            a = alone.sample(batch[row].copy())
            other.sample(batch[(row + 1) % 3])
            b = in_batch.sample(batch[row])
            assert a == b
            alone.accept(a)
            in_batch.accept(b)
    assert in_batch.sample(batch[0].astype(np.float64)) == alone.sample(batch[0])


# ---------------------------------------------------------------- logprobs

def test_token_logprobs_match_float64_log_softmax():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1000) * 4).astype(np.float32)
    x[[10, 11, 500]] = x.max() + 1                                # a three-way tie at the top
    ref = x.astype(np.float64) - x.max() - np.log(np.exp(x.astype(np.float64) - x.max()).sum())
    chosen, top = token_logprobs(x, 123, 5)
    assert chosen == pytest.approx(ref[123], abs=1e-6)
    order = np.lexsort((np.arange(1000), -ref))[:5]
    assert [i for i, _ in top] == order.tolist() and order[:3].tolist() == [10, 11, 500]
    assert np.allclose([lp for _, lp in top], ref[order], atol=1e-6)
    assert token_logprobs(x, 0, 0)[1] == []


def test_sampler_top_logprobs_use_raw_logits_and_params_n():
    x = L5.copy()
    s = make_sampler(SamplingParams(temperature=0.5, repetition_penalty=2.0, logprobs=2), 0, 5, prompt_ids=[1])
    chosen, top = s.top_logprobs(x, 3)
    assert chosen == pytest.approx(math.log(0.25), abs=1e-6)
    assert [i for i, _ in top] == [1, 3]
    assert [lp for _, lp in top] == pytest.approx([math.log(0.4), math.log(0.25)], abs=1e-6)
    assert len(s.top_logprobs(x, 3, n=4)[1]) == 4


# ---------------------------------------------------------------- compiled helpers vs naive twins

def naive_top_n(x, n):
    order = np.lexsort((np.arange(x.size), -x))
    return order[x[order] > -np.inf][:n]


def test_top_n_kernel_matches_naive_twin():
    rng = np.random.default_rng(1)
    for trial in range(300):
        size = int(rng.integers(1, 700))
        x = rng.integers(-4, 5, size).astype(np.float32 if trial % 3 else np.float64)   # many ties
        x[rng.random(size) < 0.15] = -np.inf
        n = int(rng.integers(0, size + 3))                        # crosses HEAP_MAX: both code paths
        assert np.array_equal(ks.top_n(x, n), naive_top_n(x, n)), (size, n)


def test_top_n_group_floor_path_matches_naive_twin():
    """Large arrays take the group-max floor (>= 4n groups of TOP_GROUP ids): same ids as the naive twin, with
    ties spread over groups, -inf entries, a tail past the last full group and n = 1."""
    rng = np.random.default_rng(4)
    for trial in range(60):
        size = int(rng.integers(4 * ks.TOP_GROUP, 20000))
        x = rng.integers(-30, 31, size).astype(np.float32 if trial % 2 else np.float64)
        x[rng.random(size) < 0.3] = -np.inf
        if trial % 5 == 0:
            x[:] = -np.inf                                       # nothing finite: nothing comes back
            x[rng.integers(0, size, 3)] = 1.0
        for n in (1, 2, int(rng.integers(3, max(4, size // ks.TOP_GROUP // 4)))):
            assert np.array_equal(ks.top_n(x, n), naive_top_n(x, n)), (size, n)


def test_exp_weights_matches_float64_exp():
    """The vectorised float32 exp of x - top: within 1 ulp of the float64 exp of the same float32 difference,
    over the whole normal range; 0 below it and for -inf; the float64 total of the float32 weights."""
    t = np.concatenate([np.linspace(-87.33, 0, 400_001), -np.geomspace(1e-8, 87.3, 2001), [0.0, -0.0]])
    x = (t + 3.5).astype(np.float32)
    w = np.full_like(x, np.nan)
    total = ks.exp_weights(x, np.float32(3.5), w)
    ref = np.exp((x - np.float32(3.5)).astype(np.float64))      # the float32 difference is the exp's input
    ulp = np.abs(w - ref) / np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert ulp.max() <= 1.0
    assert total == pytest.approx(float(w.astype(np.float64).sum()), rel=1e-12)
    tiny = np.array([-87.4, -100.0, -1e30, -np.inf], np.float32)
    out = np.full_like(tiny, np.nan)
    assert ks.exp_weights(tiny, 0.0, out) == 0.0 and np.array_equal(out, np.zeros(4, np.float32))
    with pytest.raises(TypeError):
        ks.exp_weights(x.astype(np.float64), 0.0, w)
    with pytest.raises(TypeError):
        ks.exp_weights(x, 0.0, w[:-1])


def test_canonical_order_matches_lexsort():
    rng = np.random.default_rng(2)
    vals = np.concatenate([rng.standard_normal(500), [0.0, -0.0, 0.0, np.inf, -np.inf, 1e-30, -1e-30]])
    vals = vals.astype(np.float32)
    ids = rng.permutation(vals.size) * 3
    got = ks.canonical_order(ids, vals)
    assert np.array_equal(got, ids[np.lexsort((ids, -vals))])


def test_mask_kernel_matches_numpy():
    rng = np.random.default_rng(3)
    for size in (1, 31, 32, 33, 1000):
        allowed = rng.random(size) < 0.4
        words = np.zeros(-(-size // 32), np.uint32)
        for i in np.flatnonzero(allowed):
            words[i // 32] |= np.uint32(1 << (i % 32))
        for mask in (allowed, words):
            x = rng.standard_normal(size).astype(np.float32)
            expected = np.where(allowed, x, -np.inf).astype(np.float32)
            ks.mask_disallowed(x, mask)
            assert np.array_equal(x, expected)


def test_kernel_wrappers_check_inputs():
    with pytest.raises(TypeError):
        ks.top_n(np.zeros((2, 2), np.float32), 1)
    with pytest.raises(TypeError):
        ks.mask_disallowed(np.zeros(4, np.float64), np.ones(4, bool))
    with pytest.raises(ValueError):
        ks.mask_disallowed(np.zeros(40, np.float32), np.ones(1, np.uint32))


def test_stop_matcher_is_exported():
    assert StopMatcher(["x"]).push("axb") == ("a", True)
