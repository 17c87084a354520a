"""The paged KV cache's bookkeeping: blocks for sequences, slots, and the prefix cache's hashes, reference
counts, pending blocks and LRU eviction."""
import pytest

from bitnet_batch.engine.kv_cache import block_hashes
from bitnet_batch.errors import ContextOverflowError
from conftest import small_kv as kv


def test_blocks_are_reserved_as_sequences_grow_and_come_back_when_freed():
    cache = kv(n_blocks=8, max_seqs=2, prefix_cache=False)
    a = cache.allocate()
    cache.reserve(a, 5)                                                 # 2 blocks of 4
    assert cache.free_blocks == 6 and (cache.block_tables[a, :3] >= 0).tolist() == [True, True, False]
    cache.reserve(a, 8)                                                 # still 2
    cache.reserve(a, 9)
    assert cache.free_blocks == 5
    b = cache.allocate()
    assert cache.free_slots == 0 and not cache.can_admit(4)
    with pytest.raises(RuntimeError, match="no free KV slot"):
        cache.allocate()
    with pytest.raises(MemoryError, match="KV cache exhausted"):
        cache.reserve(b, 4 * 6)
    with pytest.raises(ContextOverflowError):
        cache.reserve(b, 8 * 4 + 1)
    cache.free(a)
    assert cache.free_blocks == 8 and cache.free_slots == 1 and (cache.block_tables[a] == -1).all()
    assert cache.can_admit(8 * 4)


def test_a_request_reserved_at_once_gets_consecutive_blocks_also_after_churn():
    """The cache is KV-head major so that consecutive blocks are one run per KV head (attention streams them):
    reserving a request's blocks at once takes a run, and a finished request's blocks come back as one."""
    cache = kv(n_blocks=16, max_seqs=3, prefix_cache=False)
    a, b = cache.allocate(), cache.allocate()
    cache.reserve(a, 4 * 5)
    cache.reserve(b, 4 * 6)
    run = lambda s, n: cache.block_tables[s, :n].tolist()               # noqa: E731
    assert run(a, 5) == list(range(5)) and run(b, 6) == list(range(5, 11))
    cache.free(a)
    c = cache.allocate()
    cache.reserve(c, 4 * 4)
    assert run(c, 4) == list(range(4))
    assert cache.k.shape == (1, 1, 16, 4, 2)                            # [layer, KV head, block, position, dim]


def test_block_hashes_are_chained_over_full_blocks():
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2                                                  # the partial third block has none
    assert block_hashes(list(range(8)) + [99, 98], 4) == a              # the same first 8 tokens
    b = block_hashes([0, 1, 2, 3, 4, 5, 6, 7 + 1, 8, 9], 4)
    assert b[0] == a[0] and b[1] != a[1]
    c = block_hashes([9, 1, 2, 3, 4, 5, 6, 7], 4)
    assert c[0] != a[0] and c[1] != a[1]                                # block 1 carries its parent's hash
    assert block_hashes(list(range(8)), 4, salt=b"other model") != a
    assert kv(prefix_cache=False).hashes(list(range(8))) == []


def test_shared_blocks_are_counted_once_and_freed_with_their_last_reader():
    cache = kv(n_blocks=10)
    hashes = cache.hashes(list(range(12)))                              # 3 full blocks
    a = cache.allocate()
    cache.share(a, [], hashes)
    cache.reserve(a, 14)                                                # 4 blocks
    assert cache.match(hashes, 3) == ([], 3)                            # being computed by a: pending
    cache.register(a, hashes, 2)
    blocks_a = cache.block_tables[a, :4].tolist()
    assert cache.match(hashes, 3) == (blocks_a[:2], 1) and cache.cached_blocks == 2
    cache.register(a, hashes, 3)
    hits, pending = cache.match(hashes, 3)
    assert hits == blocks_a[:3] and pending == 0
    assert cache.free_blocks == 6
    assert cache.can_admit(12 + 8, hits) and not cache.can_admit(12 + 8 * 4 - 4, hits)
    b = cache.allocate()
    cache.share(b, hits, hashes)
    cache.reserve(b, 20)                                                # 5 blocks: 3 shared + 2 new
    assert cache.block_tables[b, :3].tolist() == blocks_a[:3] and cache.free_blocks == 4
    assert cache.shared_tokens(b) == 12 and cache.shared_tokens(a) == 0
    cache.free(a)                                                       # b still reads the 3 shared blocks
    assert cache.free_blocks == 5 and cache.cached_blocks == 3
    assert cache.match(hashes, 3) == (blocks_a[:3], 0)
    cache.free(b)                                                       # now idle, still cached
    assert cache.free_blocks == 10 and cache.cached_blocks == 3
    assert cache.match(hashes, 3) == (blocks_a[:3], 0)


def test_idle_cached_blocks_are_evicted_least_recently_used_tail_first():
    cache = kv(n_blocks=8)
    h1, h2 = cache.hashes([1] * 8), cache.hashes([2] * 8)
    for h in (h1, h2):                                                  # two 2-block prefixes, then idle
        s = cache.allocate()
        cache.share(s, [], h)
        cache.reserve(s, 8)
        cache.register(s, h, 2)
        cache.free(s)
    assert cache.cached_blocks == 4 and cache.free_blocks == 8
    s = cache.allocate()
    cache.reserve(s, 20)             # 5 blocks: the 4 never used, then the LRU idle one: h1's tail
    assert len(cache.match(h1, 2)[0]) == 1 and len(cache.match(h2, 2)[0]) == 2
    t = cache.allocate()
    hits, _ = cache.match(h2, 2)
    cache.share(t, hits, h2)                                            # h2 read again: not evictable
    cache.reserve(t, 8)
    cache.reserve(s, 24)                                                # takes h1's head, never h2
    assert cache.match(h1, 2) == ([], 0) and cache.match(h2, 2)[0] == hits
    with pytest.raises(MemoryError):
        cache.reserve(s, 28)


def test_a_pending_block_is_released_when_its_sequence_leaves_early():
    cache = kv()
    h = cache.hashes(list(range(8)))
    s = cache.allocate()
    cache.share(s, [], h)
    cache.reserve(s, 8)
    assert cache.match(h, 2) == ([], 2)
    cache.free(s)                                                       # failed before computing them
    assert cache.match(h, 2) == ([], 0) and cache.cached_blocks == 0


