"""The blocks of a model whose sliding-window layers keep a group of their own (window_blocks.py): the sliding
group gives back the blocks before every later query's window, allocations take blocks in both groups or neither,
a prefix hit needs the window's blocks before it still cached, and an imported prompt holds only its last window."""

from sagellm.runtime.engine.block_manager import BlockManager
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.kv_budget import window_group_blocks
from sagellm.runtime.engine.kv_cache import bytes_per_block, window_group
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.window_blocks import WindowedBlocks
from tests.tiny_models import tiny_model_config

WINDOW, BS = 8, 4  # a query sees itself and the 7 keys before it


def seq(request_id: str, n: int, first: int = 0) -> Sequence:
    return Sequence(request_id, list(range(first, first + n)), SamplingParams())


def held(blocks: WindowedBlocks, s: Sequence) -> list[int]:
    return [b for b in s.window_table if b != blocks.sliding.null_block]


def compute(blocks: WindowedBlocks, s: Sequence, n: int, cached: list[int] = ()) -> None:
    """One step computing `n` tokens of `s` (after its cached prefix)."""
    assert blocks.allocate(s, n, cached)
    s.num_computed_tokens = len(cached) * BS + n if cached else s.num_computed_tokens + n
    blocks.cache_full_blocks(s)


def test_a_decoding_sequence_holds_only_its_window_in_the_sliding_group():
    blocks = WindowedBlocks(num_blocks=40, num_window_blocks=12, block_size=BS, window=WINDOW,
                            enable_prefix_caching=True)  # fmt: skip
    s = seq("a", 100)
    compute(blocks, s, 20)  # the next query, 20, sees 13..20: blocks 3, 4, 5
    assert len(s.block_table) == len(s.window_table) == 5
    assert s.window_table[:3] == [blocks.sliding.null_block] * 3 and len(held(blocks, s)) == 2
    for _ in range(40):
        compute(blocks, s, 1)
        assert len(held(blocks, s)) <= WINDOW // BS + 1
    assert len(s.block_table) == 15 and blocks.full.num_free_blocks == 25
    assert blocks.sliding.num_free_blocks == 11 - len(held(blocks, s))
    blocks.free(s)
    assert blocks.full.num_free_blocks == 40 and blocks.sliding.num_free_blocks == 11  # the null block stays out


def test_a_chunk_holds_the_window_before_it_and_all_its_own_tokens():
    blocks = WindowedBlocks(40, 12, BS, WINDOW, True)
    s = seq("a", 100)
    compute(blocks, s, 24)
    assert blocks.allocate(s, 16)  # queries 24..39: the first sees 17.. (block 4), all write their own
    assert held(blocks, s) == s.window_table[4:] and len(s.window_table) == 10


def test_an_allocation_takes_blocks_in_both_groups_or_in_neither():
    blocks = WindowedBlocks(40, 4, BS, WINDOW, True)  # 3 sliding blocks besides the null one
    s = seq("a", 100)
    assert not blocks.allocate(s, 16)  # 4 sliding blocks: nothing taken from the full group either
    assert s.block_table == s.window_table == [] and blocks.full.num_free_blocks == 40
    assert blocks.allocate(s, 12)
    blocks.free(s)
    small = WindowedBlocks(2, 12, BS, WINDOW, True)
    assert not small.allocate(s, 12) and s.window_table == [] and small.sliding.num_free_blocks == 11


def test_a_prefix_hit_needs_the_window_before_it_cached_in_the_sliding_group():
    blocks = WindowedBlocks(40, 10, BS, WINDOW, True)
    first = seq("a", 30)
    compute(blocks, first, 30)
    blocks.free(first)
    again = seq("b", 30)
    cached = blocks.find_cached_prefix(again)
    assert len(cached) == 7  # 28 tokens; their window's blocks (5, 6) were given back but are still cached
    compute(blocks, again, 2, cached)
    assert again.window_table[:5] == [blocks.sliding.null_block] * 5
    blocks.free(again)
    for i in range(7):  # other prompts reuse every free sliding block: the window before the hit is gone
        other = seq(f"o{i}", 8, first=1000 + 10 * i)
        compute(blocks, other, 8)
        blocks.free(other)
    assert blocks.find_cached_prefix(seq("c", 30)) == []


def test_an_imported_prompt_holds_only_the_window_of_its_first_decode():
    blocks = WindowedBlocks(40, 8, BS, WINDOW, True)
    s = seq("a", 30)
    assert blocks.allocate(s, 30, first_query=30)  # the decode at 30 sees 23..30: blocks 5, 6, 7
    assert len(s.block_table) == 8 and held(blocks, s) == s.window_table[5:]


def test_the_full_group_gets_what_the_sliding_layers_no_longer_hold():
    config = tiny_model_config(num_layers=4, sliding_window=WINDOW,
                               layer_types=("sliding_attention", "full_attention") * 2)  # fmt: skip
    assert window_group(config) == WINDOW
    assert window_group(tiny_model_config(sliding_window=WINDOW)) == 0  # every layer slides: one group
    engine = EngineConfig(block_size=BS, max_num_seqs=2, max_num_batched_tokens=16)
    full, sliding = window_group_blocks(engine, config, 100, max_model_len=4096)  # memory cut the cache to 100
    assert sliding == 2 * 2 * (WINDOW // BS + 2) + 16 // BS + 1
    per_full, per_sliding = bytes_per_block(config, BS, window=0), bytes_per_block(config, BS, window=WINDOW)
    assert full == (100 * (per_full + per_sliding) - sliding * per_sliding) // per_full
    given = EngineConfig(block_size=BS, max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=100)
    assert window_group_blocks(given, config, 100, 4096) == (100, sliding)
    assert window_group_blocks(engine, config, 10, 4096)[1] == 11  # never more than the full group's (+ null)
    assert window_group_blocks(EngineConfig(tensor_parallel_size=2), config, 100, 4096) == (100, 0)


def test_a_block_manager_without_a_window_has_no_null_block():
    bm = BlockManager(4, BS)
    assert bm.null_block is None and bm.passed_blocks(100) == 0 and bm.num_free_blocks == 4
