"""Block manager: allocation, ref counts, prefix hits by chained hashes, LRU eviction, full-cache answers."""

from sagellm.runtime.engine.block_manager import BlockManager
from sagellm.runtime.engine.prefix_hash import block_hashes
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.sequence import Sequence


def seq(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, tokens, SamplingParams())


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    cached = bm.find_cached_prefix(s)
    computed = len(cached) * bm.block_size
    assert bm.allocate(s, s.num_tokens - computed, cached)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)


def test_allocate_counts_blocks_and_answers_false_when_full():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq("a", list(range(10)))  # 3 blocks
    assert bm.allocate(a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1
    b = seq("b", list(range(100, 108)))  # 2 blocks: does not fit
    assert not bm.allocate(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1  # nothing taken on failure
    bm.free(a)
    assert bm.num_free_blocks == 4 and a.block_table == []


def test_growing_one_token_at_a_time_adds_a_block_at_the_boundary():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq("s", [1, 2, 3, 4])
    assert bm.allocate(s, 4)
    s.num_computed_tokens = 4
    s.append_token(5)
    assert bm.allocate(s, 1) and len(s.block_table) == 2
    s.num_computed_tokens = 5
    s.append_token(6)
    assert bm.allocate(s, 1) and len(s.block_table) == 2


def test_shared_prefix_is_found_and_shared_by_ref_count():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = seq("first", list(range(12)))
    run_prefill(bm, first)
    second = seq("second", list(range(8)) + [99, 98, 97])
    cached = bm.find_cached_prefix(second)
    assert cached == first.block_table[:2]
    assert bm.allocate(second, second.num_tokens - 8, cached)
    assert second.block_table[:2] == first.block_table[:2]
    assert bm.blocks[cached[0]].ref_count == 2
    assert bm.prefix_hits == 2


def test_a_full_hit_still_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, seq("a", list(range(8))))
    again = seq("b", list(range(8)))
    assert len(bm.find_cached_prefix(again)) == 1  # 8 tokens cached, but the last block is recomputed


def test_chained_hash_needs_the_same_prefix_not_just_the_same_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    other = seq("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])  # second block equal, first differs
    assert bm.find_cached_prefix(other) == []


def test_a_cache_salt_shares_blocks_only_within_its_salt():
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(12))
    salted = seq("a", tokens)
    salted.cache_salt = "tenant-a"
    run_prefill(bm, salted)
    assert bm.find_cached_prefix(seq("plain", tokens)) == []  # the unsalted prompt shares nothing
    other = seq("b", tokens)
    other.cache_salt = "tenant-b"
    assert bm.find_cached_prefix(other) == []
    same = seq("a2", tokens)
    same.cache_salt = "tenant-a"
    assert bm.find_cached_prefix(same) == salted.block_table[:2]
    # the control plane's prediction of a prefix (route's cache_aware) hashes as the engine does
    assert block_hashes(tokens, 4, "tenant-a")[:2] == [bm.blocks[b].hash for b in salted.block_table[:2]]
    assert block_hashes(tokens, 4) != block_hashes(tokens, 4, "tenant-a")


def test_freed_blocks_stay_cached_until_reused_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq("a", [1, 2, 3, 4, 5])
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    # still findable after free
    assert len(bm.find_cached_prefix(seq("a2", [1, 2, 3, 4, 5]))) == 2
    # new sequences take the never-cached blocks first, then evict the cached tail before the head
    assert bm.allocate(seq("b", [7, 7, 7]), 3)
    assert len(bm.find_cached_prefix(seq("a3", [1, 2, 3, 4, 5]))) == 2
    assert bm.allocate(seq("c", [8, 8]), 2)
    assert len(bm.find_cached_prefix(seq("a4", [1, 2, 3, 4, 5]))) == 1
    bm.free(seq("nothing", []))
    assert bm.num_free_blocks == 1 and bm.allocate(seq("d", [9]), 1)
    assert bm.find_cached_prefix(seq("a5", [1, 2, 3, 4, 5])) == []


def test_reviving_cached_blocks_counts_against_free_space():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq("a", [1, 2, 3, 4, 5])
    run_prefill(bm, a)  # 3 blocks, 2 of them cached
    bm.free(a)
    b = seq("b", [1, 2, 3, 4, 6, 6, 6])
    cached = bm.find_cached_prefix(b)
    assert len(cached) == 2
    assert not bm.allocate(b, 3, cached)  # needs 2 more blocks, only 1 left after reviving 2
    assert bm.allocate(b, 1, cached)


def test_blocks_are_named_by_the_hash_the_router_predicts_with():
    """The control plane's PrefixIndex and the engine's prefix cache must agree on what names a prefix."""
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence("a", list(range(10)), SamplingParams())
    assert manager.allocate(seq, 10)
    seq.num_computed_tokens = 10
    manager.cache_full_blocks(seq)
    assert [manager.blocks[b].hash for b in seq.block_table[:2]] == block_hashes(seq.token_ids, 4)
