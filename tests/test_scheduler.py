"""Continuous batching's bookkeeping: admission refused and accepted under slot and block budgets, step plans,
retirement, and prefix-aware admission."""
import pytest

from bitnet_batch.scheduler import Scheduler
from conftest import sequence as seq
from conftest import small_kv as kv


def test_admission_stops_at_the_slot_and_block_budgets_and_resumes_after_retirement():
    cache = kv(n_blocks=10, max_seqs=3, prefix_cache=False)
    sched = Scheduler(cache, max_batch=3, row_budget=16)
    for k, n in enumerate((10, 14, 6, 3)):              # prompt + 2 new tokens: 3, 4, 2 and 2 blocks of 4
        sched.add(seq(k, list(range(n))))
    assert [s.key for s in sched.admit()] == [0, 1, 2] and cache.free_blocks == 1
    assert sched.admit() == [] and [s.key for s in sched.waiting] == [3]       # every slot taken
    sched.retire(sched.running[1])
    assert [s.key for s in sched.admit()] == [3] and cache.free_blocks == 3


def test_a_sequence_that_does_not_fit_waits_and_keeps_its_place():
    cache = kv(n_blocks=8, max_seqs=4, prefix_cache=False)
    sched = Scheduler(cache, max_batch=4, row_budget=32)
    sched.add(seq(0, list(range(20))))                  # 6 blocks
    sched.add(seq(1, list(range(12))))                  # 4 blocks: not beside the first
    sched.add(seq(2, list(range(2))))                   # 1 block: would fit, but arrival order is kept
    assert [s.key for s in sched.admit()] == [0] and [s.key for s in sched.waiting] == [1, 2]
    sched.retire(sched.running[0])
    assert [s.key for s in sched.admit()] == [1, 2] and cache.free_blocks == 3
    with pytest.raises(ValueError, match="needs 34 positions"):
        sched.add(seq(3, list(range(32))))              # longer than any sequence may be


def test_plans_put_decode_rows_first_then_prefill_chunks_within_the_row_budget():
    sched = Scheduler(kv(n_blocks=32, max_seqs=4, prefix_cache=False), max_batch=4, row_budget=8)
    a, b = seq(0, list(range(6))), seq(1, list(range(9)))
    sched.add(a)
    sched.add(b)
    sched.admit()
    assert [(p.seq.key, p.start, len(p.tokens), p.want_logits) for p in sched.plan()] == [(0, 0, 6, True),
                                                                                          (1, 0, 2, False)]
    a.generated.append(7)
    assert [(p.seq.key, p.start, len(p.tokens), p.want_logits) for p in sched.plan()] == [(0, 6, 1, True),
                                                                                          (1, 2, 7, True)]


def _run_prefill(sched):
    """Plan steps and 'compute' them (commit) until every admitted sequence has prefilled its prompt."""
    while any(s.prefilling for s in sched.running):
        sched.commit([p for p in sched.plan() if p.start < len(p.seq.prompt)])


def test_a_shared_prefix_lets_more_sequences_fit_the_same_budget():
    prefix = list(range(20))                                            # 5 blocks
    def admitted(prefix_cache):
        cache = kv(n_blocks=24, max_seqs=8, prefix_cache=prefix_cache)
        sched = Scheduler(cache, max_batch=8, row_budget=64)
        for i in range(8):
            sched.add(seq(i, prefix + [100 + i], max_new=3))            # 24 tokens: 6 blocks alone
        sched.admit()
        _run_prefill(sched)
        sched.admit()
        return len(sched.running)

    assert admitted(False) == 4                                         # 4 x 6 blocks
    assert admitted(True) == 8                                          # 5 shared blocks + 1 own each


def test_sequences_wait_for_a_prefix_being_computed_and_cached_ones_go_first():
    cache = kv(n_blocks=64, max_seqs=8)
    sched = Scheduler(cache, max_batch=8, row_budget=8)
    shared = list(range(16))
    for i in range(3):
        sched.add(seq(i, shared + [50 + i]))
    sched.add(seq(3, [7] * 9))                                          # shares nothing
    assert [s.key for s in sched.admit()] == [0, 3]                     # 1 and 2 wait for 0's blocks
    parts = sched.plan()
    assert [(p.seq.key, p.start, len(p.tokens)) for p in parts] == [(0, 0, 8)]   # 8-row budget
    sched.commit(parts)
    assert sched.admit() == []                                          # 0's last 2 blocks still pending
    _run_prefill(sched)
    late = sched.admit()
    assert [s.key for s in late] == [1, 2] and [s.n_cached for s in late] == [16, 16]
    assert all(s.n_prefilled == 16 for s in late)
    # among waiting sequences, one whose prefix is cached is admitted before an earlier one with nothing cached
    sched.max_batch = len(sched.running) + 1
    sched.add(seq(4, [9] * 20))
    sched.add(seq(5, shared + [1]))
    assert [s.key for s in sched.admit()] == [5]


def test_a_sequence_passed_over_max_batch_times_goes_first():
    cache = kv(n_blocks=64, max_seqs=8)
    sched = Scheduler(cache, max_batch=2, row_budget=64)
    shared = list(range(8))
    sched.add(seq(0, shared + [1]))
    sched.admit()
    _run_prefill(sched)
    sched.add(seq(1, [9] * 5))
    for k in range(2, 8):
        sched.add(seq(k, shared + [k]))
    order = []
    while sched.waiting:
        for s in sched.admit():
            order.append(s.key)
        for s in list(sched.running):
            sched.retire(s)
        _run_prefill(sched)
    assert order.index(1) == 2                      # passed over twice (max_batch), then taken


def test_a_whole_cached_prompt_still_computes_its_last_token():
    cache = kv(n_blocks=64, max_seqs=8)
    sched = Scheduler(cache, max_batch=8, row_budget=64)
    prompt = list(range(12))                                            # exactly 3 blocks
    sched.add(seq(0, prompt))
    sched.admit()
    _run_prefill(sched)
    sched.add(seq(1, prompt))
    sched.add(seq(2, prompt + [5], cache_limit=6))                      # a scorer needing logits from row 6
    b, c = sched.admit()
    assert b.n_cached == 8 and [p.start for p in sched.plan() if p.seq is b] == [8]
    assert c.n_cached == 4


