"""A LoRA request's prefix blocks are named by its cache salt and its adapter's weights, alike in the engine and the
control plane: the blocks a tiny Llama's engine registers for a prompt run under a PEFT adapter and a salt are exactly
the ones route and pd_split record for the same request as the gateway makes it; an adapter file replaced at the same
path (same name) gets another digest, hence other blocks, and equal weights the same ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sagellm import LLM, SamplingParams
from sagellm.gateway.serving.instances import InstanceRegistry
from sagellm.gateway.serving.lora_modules import LoraModules
from sagellm.gateway.serving.readiness import ModelReadiness
from sagellm.operators.pd_split import PDSplit
from sagellm.operators.route import Route, prefix_salt
from sagellm.runtime.engine.lora_digest import adapter_digest
from sagellm.runtime.engine.lora_request import LoRARequest
from sagellm.runtime.engine.prefix_hash import block_hashes
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.models.lora_adapter import read_lora_adapter
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext
from tests.engine.test_lora import ALL, _adapter
from tests.oracle import random_prompts
from tests.tiny_models import make_tiny_llama

BLOCK = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-salt")
    base = make_tiny_llama(root / "base")
    return base, _adapter(base, root / "first", 1, r=4, lora_alpha=8, target_modules=ALL)


def _gateway_lora(path: Path) -> LoRARequest:
    """The LoRARequest the gateway's `--lora-modules first=PATH` makes for requests naming the adapter."""
    graph = Graph()
    graph.add("engine", enable_lora=True, max_lora_rank=8)
    registry = InstanceRegistry("tiny", lambda: None)
    return LoraModules(graph, registry, ModelReadiness(registry), lambda: None).add("first", str(path))


def _engine_blocks(base: Path, prompt: list[int], salt: str, lora: LoRARequest) -> set[int]:
    """The hashes of the blocks a fresh engine registers in its prefix cache after running the prompt."""
    llm = LLM(str(base), enable_lora=True, max_lora_rank=8, kv_cache_memory_gb=0.05, block_size=BLOCK)
    try:
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        llm.engine.add_request("r", prompt, params, cache_salt=salt, lora_request=lora)
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        return set(llm.engine.scheduler.block_manager.cached_hashes)
    finally:
        llm.engine.close()


def test_the_engine_registers_exactly_the_blocks_route_and_pd_split_record_for_a_lora_request(models):
    base, first = models
    prompt = random_prompts(256, [40], seed=11)[0]  # two full blocks; 2 more tokens complete no third
    lora = _gateway_lora(first)
    assert lora.lora_digest is not None
    request = Request(request_id="r", prompt_token_ids=prompt, cache_salt="tenant-a", lora=lora)
    predicted = block_hashes(prompt, BLOCK, prefix_salt(request))
    assert len(predicted) == 2
    assert _engine_blocks(base, prompt, "tenant-a", lora) == set(predicted)

    route = Route(strategy="cache_aware", block_size=BLOCK)
    route.open(OperatorContext(node_id="route", outputs=["e0"], instances={"e0": InstanceStats(name="e0")}))
    route.execute(request)
    assert route.prefix_index.num_blocks("e0") == 2
    assert route.prefix_index.cached_tokens("e0", prompt, predicted) == 2 * BLOCK

    split = PDSplit(threshold_tokens=10_000, block_size=BLOCK)
    split.open(OperatorContext(node_id="pd_split", outputs=["route"], instances={}))
    split.execute(request)
    again = Request(request_id="q", prompt_token_ids=prompt, cache_salt="tenant-a", lora=lora)
    assert split.uncached_tokens(again) == len(prompt) - 2 * BLOCK
    assert split.prefix_index.cached_tokens("decode_capable", prompt, predicted) == 2 * BLOCK


def test_an_adapter_replaced_at_its_path_gets_other_blocks_and_equal_weights_the_same(models, tmp_path):
    base, first = models
    path = tmp_path / "adapter"
    shutil.copytree(first, path)
    before = adapter_digest(read_lora_adapter(path, "x"))
    assert adapter_digest(read_lora_adapter(first, "y")) == before  # same weights: any name, any directory

    shutil.rmtree(path)
    _adapter(base, path, 2, r=4, lora_alpha=8, target_modules=ALL)  # same name and path, other weights
    after = adapter_digest(read_lora_adapter(path, "x"))
    assert after != before
    prompt = random_prompts(256, [40], seed=12)[0]

    def hashes(digest: str) -> list[int]:
        lora = LoRARequest("x", 1, str(path), digest)
        return block_hashes(prompt, BLOCK, prefix_salt(Request(request_id="r", prompt_token_ids=prompt, lora=lora)))

    assert set(hashes(before)).isdisjoint(hashes(after))
    assert hashes(before) == hashes(adapter_digest(read_lora_adapter(first, "x")))
    scaled = shutil.copytree(first, tmp_path / "scaled")  # the same factors at another lora_alpha: other KV
    config = json.loads((scaled / "adapter_config.json").read_text())
    (scaled / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": 16}))
    assert adapter_digest(read_lora_adapter(scaled, "x")) != before
