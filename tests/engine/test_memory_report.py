"""The memory report: the weights a plan holds (each storage once, whatever holds it, a fused instruction's fallback
included, the KV caches left out), the KV cache reserved and mapped (mincore), and the rest of VmRSS."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.kv_cache import allocate_kv_caches
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.engine.memory_report import MemoryReport, kv_cache_bytes, memory_report, plan_weight_bytes
from sagellm.runtime.execution_graph.fuse_layers import FusedLayers
from sagellm.runtime.execution_graph.plan import Instr, Plan
from tests.tiny_models import make_tiny_llama, make_tiny_qwen3_5, tiny_model_config

GIB = 2**30


@dataclass(frozen=True)
class Packed:  # a backend's packed weight: tensors inside an object
    data: torch.Tensor
    parts: tuple[torch.Tensor, ...] = ()
    scale: float = 1.0


def _plan(*consts: object) -> Plan:
    return Plan([Instr(print, (), consts, (0,), "op")], 1, {}, {})


def test_weights_are_each_storage_once_wherever_held_and_the_caches_left_out() -> None:
    embedding = torch.zeros(100, 8)  # 3,200 bytes
    norm = torch.ones(8)  # 32
    blocks = torch.zeros(50, dtype=torch.uint8)  # 50
    k, v = torch.zeros(4, 16), torch.zeros(4, 16)
    fallback = _plan(Packed(blocks, (embedding[:10],)), k, v, {"bias": norm})
    fused = FusedLayers(kernel=lambda *a: None, fallback=fallback, inputs=("hidden", "positions", "meta"))
    plan = Plan(
        [
            Instr(print, (), (embedding, 1e-5, None), (0,), "embedding"),
            Instr(fused, (), (), (1,), "layers"),
            Instr(print, (), (norm, embedding.t()), (2,), "head"),  # a tied head: the embedding's storage again
        ],
        3,
        {},
        {},
    )
    assert plan_weight_bytes(plan, skip=[k, v]) == 3200 + 32 + 50
    assert plan_weight_bytes(plan) == 3200 + 32 + 50 + 2 * 256


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN's opaque tensors need mkldnn")
def test_an_opaque_onednn_weight_counts_its_elements() -> None:
    opaque = torch.ones(16, 8).to_mkldnn()
    assert plan_weight_bytes(_plan(Packed(opaque))) == 16 * 8 * 4


@pytest.mark.skipif(sys.platform != "linux", reason="mincore of an untouched mapping is Linux's")
def test_an_untouched_cache_is_reserved_not_mapped_until_written() -> None:
    config = tiny_model_config(num_layers=2, head_dim=64)  # 8 KiB a block of 16 tokens
    caches = allocate_kv_caches(config, num_blocks=8192, block_size=16, device=torch.device("cpu"))
    reserved, mapped = kv_cache_bytes(caches)
    assert reserved == 4 * 8192 * 8192
    assert mapped < reserved // 8  # at most a (huge) page per tensor, where the allocator wrote its header
    caches[0][0][1000:1100] = 1.0  # 100 blocks of one tensor: 800 KiB
    assert kv_cache_bytes(caches)[1] >= mapped + 100 * 8192


def test_the_line_says_where_the_resident_memory_goes() -> None:
    report = MemoryReport(
        weights_bytes=GIB // 8,
        kv_reserved_bytes=2 * GIB,
        kv_mapped_bytes=GIB // 100,
        kv_tokens=45000,
        rss_bytes=GIB * 6 // 10,
    )
    assert report.other_bytes == GIB * 6 // 10 - GIB // 8 - GIB // 100
    assert report.line() == (
        "weights 0.12 GiB, KV cache 2.00 GiB reserved (45,000 tokens) 0.01 GiB mapped, other 0.46 GiB, RSS 0.60 GiB"
    )
    on_gpu = MemoryReport(GIB, 2 * GIB, 2 * GIB, 45000, GIB // 2, on_host=False)
    assert on_gpu.other_bytes == GIB // 2
    assert (
        on_gpu.line()
        == "weights 1.00 GiB, KV cache 2.00 GiB reserved (45,000 tokens) in device memory; host RSS 0.50 GiB"
    )


def test_recurrent_states_are_counted_apart_from_the_weights(tmp_path) -> None:
    """A Qwen3.5's state slots are plan constants, like weights: the report puts them beside the KV cache."""
    engine = LLMEngine(EngineConfig(model=str(make_tiny_qwen3_5(tmp_path / "q")), num_kv_blocks=64, max_num_seqs=4))
    report = memory_report([engine.runner])
    states = sum(t.numel() * 4 for pair in engine.runner.state_caches for t in pair)
    assert report.state_slots == 8 and report.state_reserved_bytes == states > 0  # 4 seats, 4 checkpoints
    kv = [t for pair in engine.runner.kv_caches for t in pair]
    assert report.weights_bytes == plan_weight_bytes(engine.runner.plan, skip=kv) - states
    assert "states 0.00 GiB reserved (8 slots)" in report.line()


def test_an_engine_reports_its_plan_and_cache(tmp_path) -> None:
    path = make_tiny_llama(tmp_path / "llama")  # 2 layers of hidden 64, MLP 128, vocabulary of the tiny tokenizer
    engine = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=64))
    try:
        report = memory_report([engine.runner])
        k = engine.runner.kv_caches[0][0]
        assert report.kv_reserved_bytes == 4 * k.numel() * 4 and report.kv_tokens == 64 * 16
        params = sum(t.numel() for t in load_file(path / "model.safetensors").values())  # fp32, packed as such
        assert params * 4 <= report.weights_bytes <= 2 * params * 4 + 2**20  # the rotary tables are constants too
        assert report.rss_bytes > report.weights_bytes and report.on_host
    finally:
        engine.close()
