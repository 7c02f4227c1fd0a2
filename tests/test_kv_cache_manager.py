"""Block manager: exact block ids, ref counts, prefix-cache hits, LRU eviction, copy-on-write."""

import pytest

from jaxllm.engine.kv_cache_manager import (
    NULL_BLOCK_ID,
    Allocation,
    ComputedBlocks,
    KVCacheManager,
    hash_block,
    salt_hash,
)
from jaxllm.engine.request import Request
from jaxllm.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, tokens) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=8), arrival_time=0.0)


def admit(kv: KVCacheManager, request: Request) -> ComputedBlocks:
    """Admit a new request the way the scheduler does and pretend its whole prefill ran."""
    computed = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - computed.num_tokens, computed) is not None
    request.num_computed_tokens = request.num_tokens
    return computed


def test_fresh_pool_hands_out_ids_in_order_and_never_the_null_block():
    kv = KVCacheManager(num_blocks=11, block_size=BS)
    assert kv.num_usable_blocks == 10 and kv.num_free_blocks == 10
    request = make_request("a", range(40))
    allocation = kv.allocate_slots(request, 40)
    assert allocation.new_block_ids == tuple(range(1, 11))
    assert NULL_BLOCK_ID not in kv.block_ids("a")
    assert kv.num_free_blocks == 0 and kv.usage == 1.0
    assert kv.allocate_slots(make_request("b", [1]), 1) is None


def test_allocation_rounds_up_and_grows_one_block_per_block_size_tokens():
    kv = KVCacheManager(num_blocks=11, block_size=BS)
    request = make_request("a", range(10))
    assert kv.allocate_slots(request, 10).new_block_ids == (1, 2, 3)
    request.num_computed_tokens = 10
    request.output_token_ids.append(99)
    assert kv.allocate_slots(request, 1).new_block_ids == ()  # position 10 fits block 3
    request.num_computed_tokens = 11
    request.output_token_ids.append(98)
    assert kv.allocate_slots(request, 1).new_block_ids == ()
    request.num_computed_tokens = 12
    request.output_token_ids.append(97)
    assert kv.allocate_slots(request, 1).new_block_ids == (4,)
    assert kv.block_ids("a") == (1, 2, 3, 4)


def test_free_returns_tail_blocks_first_and_keeps_full_block_hashes():
    kv = KVCacheManager(num_blocks=11, block_size=BS)
    request = make_request("a", range(10))
    admit(kv, request)
    kv.free(request)
    assert kv.free_block_ids() == (4, 5, 6, 7, 8, 9, 10, 3, 2, 1)
    assert kv.block_hash(1) == hash_block(None, (0, 1, 2, 3))
    assert kv.block_hash(2) == hash_block(kv.block_hash(1), (4, 5, 6, 7))
    assert kv.block_hash(3) is None  # partial block: not cacheable
    assert kv.num_used_blocks == 0
    assert all(kv.ref_count(b) == 0 for b in range(11))


def test_prefix_hit_reuses_freed_blocks_and_takes_them_out_of_the_free_queue():
    kv = KVCacheManager(num_blocks=11, block_size=BS)
    first = make_request("a", range(10))
    admit(kv, first)
    kv.free(first)
    second = make_request("b", list(range(8)) + [50, 51, 52])
    computed = admit(kv, second)
    assert computed == ComputedBlocks((1, 2), 8)
    assert kv.block_ids("b") == (1, 2, 4)  # block 4 from the LRU head for the 3 new tokens
    assert kv.free_block_ids() == (5, 6, 7, 8, 9, 10, 3)
    assert [kv.ref_count(b) for b in (1, 2, 4)] == [1, 1, 1]
    stats = kv.prefix_cache_stats
    assert (stats.queries, stats.hits) == (10 + 11, 8)
    assert stats.hit_rate == pytest.approx(8 / 21)


def test_reset_prefix_cache_forgets_contents_only_when_no_block_is_held():
    kv = KVCacheManager(num_blocks=11, block_size=BS)
    first = make_request("a", range(10))
    admit(kv, first)
    assert not kv.reset_prefix_cache()  # "a" holds blocks 1-3: refused
    kv.free(first)
    assert kv.block_hash(1) == hash_block(None, (0, 1, 2, 3))  # the refused reset forgot nothing
    probe = make_request("probe", range(10))
    assert admit(kv, probe).block_ids == (1, 2)
    kv.free(probe)
    assert kv.reset_prefix_cache()
    assert kv.block_hash(1) is None and kv.block_hash(2) is None
    assert kv.free_block_ids() == (5, 6, 7, 8, 9, 10, 3, 4, 2, 1)  # the free queue's order is kept
    again = make_request("b", range(10))
    assert admit(kv, again).num_tokens == 0  # computed afresh, in blocks from the LRU head
    assert kv.block_ids("b") == (5, 6, 7)
    assert (kv.prefix_cache_stats.queries, kv.prefix_cache_stats.hits) == (30, 8)  # counters are kept
    kv.free(again)
    assert kv.get_computed_blocks(make_request("c", range(10))).block_ids == (5, 6)  # "b" cached anew


def test_cache_salt_keeps_prefix_blocks_to_requests_with_the_same_salt():
    kv = KVCacheManager(num_blocks=21, block_size=BS)
    first = Request("a", list(range(10)), SamplingParams(max_tokens=8), arrival_time=0.0, cache_salt="tenant-1")
    admit(kv, first)
    kv.free(first)
    assert kv.block_hash(1) == hash_block(salt_hash("tenant-1"), (0, 1, 2, 3)) != hash_block(None, (0, 1, 2, 3))
    assert kv.block_hash(2) == hash_block(kv.block_hash(1), (4, 5, 6, 7))
    same = Request("b", list(range(10)), SamplingParams(max_tokens=8), arrival_time=0.0, cache_salt="tenant-1")
    other = Request("c", list(range(10)), SamplingParams(max_tokens=8), arrival_time=0.0, cache_salt="tenant-2")
    assert kv.get_computed_blocks(same) == ComputedBlocks((1, 2), 8)
    assert kv.get_computed_blocks(other) == ComputedBlocks((), 0)
    assert kv.get_computed_blocks(make_request("d", range(10))) == ComputedBlocks((), 0)  # unsalted


def test_hash_chain_equal_first_block_different_second_gives_one_hit():
    kv = KVCacheManager(num_blocks=11, block_size=BS)
    a = make_request("a", [1, 1, 1, 1, 2, 2, 2, 2, 9])
    admit(kv, a)
    kv.free(a)
    assert kv.get_computed_blocks(make_request("b", [1, 1, 1, 1, 3, 3, 3, 3, 9])) == ComputedBlocks((1,), 4)
    # Same second block content behind a different first block: the chain makes it a miss.
    assert kv.get_computed_blocks(make_request("c", [7, 7, 7, 7, 2, 2, 2, 2, 9])) == ComputedBlocks((), 0)


def test_hit_never_covers_the_whole_prompt():
    kv = KVCacheManager(num_blocks=11, block_size=BS)
    a = make_request("a", range(8))
    admit(kv, a)
    kv.free(a)
    assert kv.get_computed_blocks(make_request("b", range(8))) == ComputedBlocks((1,), 4)
    assert kv.get_computed_blocks(make_request("c", range(9))) == ComputedBlocks((1, 2), 8)


def test_running_request_blocks_are_shared_with_ref_counts():
    kv = KVCacheManager(num_blocks=11, block_size=BS)
    a = make_request("a", range(9))
    admit(kv, a)
    # Not registered until a later step knows the K/V is written.
    assert kv.get_computed_blocks(make_request("x", range(9))).num_tokens == 0
    a.output_token_ids.append(100)
    kv.allocate_slots(a, 1)
    b = make_request("b", list(range(8)) + [7])
    assert admit(kv, b) == ComputedBlocks((1, 2), 8)
    assert kv.block_ids("b") == (1, 2, 4)
    assert [kv.ref_count(i) for i in (1, 2, 3, 4)] == [2, 2, 1, 1]
    kv.free(a)
    assert [kv.ref_count(i) for i in (1, 2, 3, 4)] == [1, 1, 0, 1]
    assert 1 not in kv.free_block_ids() and 3 in kv.free_block_ids()
    kv.free(b)
    assert kv.num_free_blocks == 10


def test_lru_eviction_takes_least_recently_freed_cached_blocks_first():
    kv = KVCacheManager(num_blocks=7, block_size=BS)
    a, b = make_request("a", range(8)), make_request("b", range(100, 108))
    admit(kv, a)
    kv.free(a)
    admit(kv, b)
    kv.free(b)
    assert kv.free_block_ids() == (5, 6, 2, 1, 4, 3)
    c = make_request("c", range(200, 216))
    admit(kv, c)
    assert kv.block_ids("c") == (5, 6, 2, 1)
    assert kv.block_hash(1) is None and kv.block_hash(2) is None  # a's blocks evicted
    assert kv.get_computed_blocks(make_request("a2", range(8))).num_tokens == 0
    assert kv.get_computed_blocks(make_request("b2", range(100, 108))) == ComputedBlocks((3,), 4)


def test_failed_allocation_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(8))
    admit(kv, a)
    kv.free(a)
    b = make_request("b", list(range(8)) + list(range(50, 60)))
    computed = kv.get_computed_blocks(b)
    assert computed == ComputedBlocks((1, 2), 8)
    before = (kv.free_block_ids(), [kv.ref_count(i) for i in range(4)], kv.prefix_cache_stats)
    assert kv.allocate_slots(b, 10, computed) is None  # needs 2 hits revived + 3 new > 3 free
    assert (kv.free_block_ids(), [kv.ref_count(i) for i in range(4)], kv.prefix_cache_stats) == before
    assert kv.block_ids("b") == ()


def test_fork_then_write_copies_the_shared_partial_block():
    kv = KVCacheManager(num_blocks=11, block_size=BS)
    parent = make_request("p", range(6))
    admit(kv, parent)
    parent.output_token_ids.append(60)
    child = make_request("c", range(6))
    child.output_token_ids.append(61)
    kv.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    assert kv.block_ids("c") == (1, 2) and [kv.ref_count(1), kv.ref_count(2)] == [2, 2]
    allocation = kv.allocate_slots(parent, 1)  # position 6 lives in the shared block 2
    assert allocation.block_copies == ((2, 3),)
    assert kv.block_ids("p") == (1, 3) and kv.block_ids("c") == (1, 2)
    assert [kv.ref_count(i) for i in (1, 2, 3)] == [2, 1, 1]
    assert kv.allocate_slots(child, 1).block_copies == ()  # block 2 is the child's alone now
    kv.free(parent)
    kv.free(child)
    assert kv.num_free_blocks == 10


def test_fork_at_block_boundary_needs_no_copy():
    kv = KVCacheManager(num_blocks=11, block_size=BS)
    parent = make_request("p", range(8))
    admit(kv, parent)
    parent.output_token_ids.append(80)
    child = make_request("c", range(8))
    child.output_token_ids.append(81)
    kv.fork(parent, child)
    child.num_computed_tokens = 8
    assert kv.allocate_slots(parent, 1) == Allocation((3,), ())
    assert kv.allocate_slots(child, 1).new_block_ids == (4,)
    with pytest.raises(ValueError, match="already holds blocks"):
        kv.fork(parent, child)


def test_prefix_caching_disabled_never_hits_or_hashes():
    kv = KVCacheManager(num_blocks=11, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", range(12))
    admit(kv, a)
    kv.free(a)
    assert all(kv.block_hash(b) is None for b in range(11))
    b = make_request("b", range(12))
    assert admit(kv, b) == ComputedBlocks((), 0)
    assert kv.block_ids("b") == (4, 5, 6)
    assert (kv.prefix_cache_stats.queries, kv.prefix_cache_stats.hits) == (0, 0)


def test_duplicate_content_keeps_the_first_cached_block():
    kv = KVCacheManager(num_blocks=11, block_size=BS)
    a, b = make_request("a", range(5)), make_request("b", range(5))
    admit(kv, a)
    admit(kv, b)  # same step: a's block is not registered yet, so b computes its own copy
    kv.free(a)
    kv.free(b)
    assert kv.block_hash(1) is not None and kv.block_hash(3) is None
    assert kv.get_computed_blocks(make_request("c", range(5))) == ComputedBlocks((1,), 4)


@pytest.mark.parametrize("num_blocks, block_size", [(1, 4), (8, 0), (2.5, 4)])
def test_bad_arguments_raise(num_blocks, block_size):
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=num_blocks, block_size=block_size)


def test_sharing_accounting_counts_shared_and_saved_blocks():
    from jaxllm.engine.request import Request
    from jaxllm.sampling_params import SamplingParams

    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    parent = Request("p", list(range(10)), SamplingParams(), 0.0)
    assert kv.allocate_slots(parent, 10) is not None  # 3 blocks, the last one partial
    children = [Request(f"c{i}", list(range(10)), SamplingParams(), 0.0) for i in range(2)]
    for child in children:
        kv.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens = 10
    assert (kv.num_held_blocks, kv.num_block_references, kv.num_shared_blocks) == (3, 9, 3)
    # The first child writes token 10 into the shared partial block: it gets its own copy.
    children[0].prompt_token_ids.append(10)
    allocation = kv.allocate_slots(children[0], 1)
    assert len(allocation.block_copies) == 1
    assert (kv.num_held_blocks, kv.num_block_references, kv.num_shared_blocks) == (4, 9, 3)
