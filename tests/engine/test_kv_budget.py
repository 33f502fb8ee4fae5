"""The KV cache's size: num_kv_blocks or kv_cache_memory_gb when given; else every seat's whole context, capped by a
share of the memory free, which caps the engine's context when not even one sequence fits."""

from __future__ import annotations

import structlog
import torch

from sagellm.runtime.engine import kv_budget
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.kv_budget import KV_MEMORY_FRACTION, kv_cache_blocks
from sagellm.runtime.engine.kv_cache import bytes_per_block
from sagellm.runtime.engine.llm_engine import LLMEngine
from tests.tiny_models import make_tiny_llama, tiny_model_config

CACHE = tiny_model_config(num_layers=2, num_kv_heads=2, head_dim=8)
PER_BLOCK = bytes_per_block(CACHE, 16)  # 2 KiB


def _free(blocks: float) -> int:
    """The free memory whose capped share buys `blocks` blocks."""
    return int(blocks * PER_BLOCK / KV_MEMORY_FRACTION) + 1


def test_a_size_given_is_taken_as_given_without_reading_the_memory() -> None:
    def unread() -> int:
        raise AssertionError("a size was given: the free memory is not read")

    assert kv_cache_blocks(EngineConfig(num_kv_blocks=7), CACHE, 128, available=unread) == 7
    assert kv_cache_blocks(EngineConfig(kv_cache_memory_gb=PER_BLOCK * 10 / 2**30), CACHE, 128, available=unread) == 10


def test_by_default_every_seat_gets_its_whole_context_in_whole_blocks() -> None:
    config = EngineConfig(max_num_seqs=4)
    assert kv_cache_blocks(config, CACHE, 128, available=lambda: 2**40) == 4 * 8
    assert kv_cache_blocks(config, CACHE, 100, available=lambda: 2**40) == 4 * 7  # 100 tokens take 7 blocks


def test_the_free_memory_caps_it_and_each_rank_takes_its_share() -> None:
    assert kv_cache_blocks(EngineConfig(max_num_seqs=4), CACHE, 128, available=lambda: _free(20)) == 20
    assert kv_cache_blocks(EngineConfig(max_num_seqs=4, tensor_parallel_size=2), CACHE, 128,
                           available=lambda: _free(20)) == 10  # fmt: skip
    assert kv_cache_blocks(EngineConfig(), CACHE, 128, available=lambda: 0) == 1  # never no cache at all


def test_where_no_figure_says_the_cap_is_the_old_fixed_gib() -> None:
    wanted = kv_cache_blocks(EngineConfig(), CACHE, 128, available=lambda: None)
    assert wanted == 16 * 8  # far below a GiB
    huge = 2**22  # tokens: 16 seats of them are 16 GiB here
    assert kv_cache_blocks(EngineConfig(), CACHE, huge, available=lambda: None) == 2**30 // PER_BLOCK
    assert kv_cache_blocks(EngineConfig(), CACHE, huge, "cuda", available=lambda: 2**50) == 2**30 // PER_BLOCK


def test_an_engine_short_of_memory_caps_its_context_to_the_blocks_it_got(tmp_path, monkeypatch) -> None:
    path = make_tiny_llama(tmp_path / "llama")  # 256 positions, 2 layers of 2 KV heads of 16: 8 KiB a block
    per_block = 2 * 2 * 2 * 16 * 4 * 16
    monkeypatch.setattr(kv_budget, "available_bytes", lambda: int(5 * per_block / KV_MEMORY_FRACTION) + 1)
    with structlog.testing.capture_logs() as logs:
        engine = LLMEngine(EngineConfig(model=str(path), max_num_seqs=2))
    try:
        assert engine.scheduler.config.num_blocks == 5 and engine.max_model_len == 5 * 16
        sized = next(e for e in logs if e["event"] == "kv_cache_sized")
        assert sized["tokens"] == 80 and sized["wanted_tokens"] == 2 * 256 and sized["log_level"] == "warning"
        ready = next(e for e in logs if e["event"] == "engine_ready")
        assert "KV cache 0.00 GiB reserved (80 tokens)" in ready["memory"] and ready["max_model_len"] == 80
    finally:
        engine.close()
    monkeypatch.setattr(kv_budget, "available_bytes", lambda: 2**40)
    roomy = LLMEngine(EngineConfig(model=str(path), max_num_seqs=2, max_model_len=100))
    try:
        assert roomy.max_model_len == 100 and roomy.runner.kv_caches[0][0].shape[0] == 2 * 7
        assert roomy.runner.kv_caches[0][0].dtype == torch.float32
    finally:
        roomy.close()
