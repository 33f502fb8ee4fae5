"""pd_split reading the engines' KV events: a long prompt whose prefix an engine holds (here, in its pages and its
RAM tier) is a short prefill, so it stays colocated; with only its estimate (nothing sent through it before), pd_split
splits it."""

from __future__ import annotations

import time

import pytest

from sagellm import LLM, SamplingParams
from sagellm.operators.pd_split import PDSplit
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext
from tests import tiny_models
from tests.oracle import ENGINE_BACKEND, random_prompts

BS = 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tiny_models.make_tiny_llama(tmp_path_factory.mktemp("pd_events") / "hf")
    events = {"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:0", "replay_endpoint": "tcp://127.0.0.1:0"}
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=BS, num_kv_blocks=64, kv_offload_ram_gb=0.01,
              kv_events_config=events)  # fmt: skip
    yield llm
    llm.engine.close()


@pytest.mark.parametrize("kv_events", [True, False])
def test_a_long_prompt_an_engine_holds_stays_colocated(engine, kv_events):
    publisher = engine.engine.kv_events.publisher
    decode = InstanceStats(name="d0", role="decode", kv_events_endpoint=publisher.endpoint,
                           kv_events_replay_endpoint=publisher.replay_endpoint)  # fmt: skip
    pool = [InstanceStats(name="p0", role="prefill"), decode]
    split = PDSplit(threshold_tokens=32, block_size=BS, kv_events=kv_events)
    split.open(OperatorContext(node_id="pd_split", outputs=["route"], instances={s.name: s for s in pool}))
    prefix, suffix = random_prompts(engine.engine.model.config.vocab_size, [120, 8], seed=3)
    engine.generate([prefix], SamplingParams(max_tokens=2))
    if kv_events:
        split.uncached_tokens(Request(request_id="warm", prompt_token_ids=[1, 2, 3]))  # starts following d0
        deadline = time.monotonic() + 30
        while not split.prefix_index.follows("d0"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.6)  # the step's batch is out (an idle engine's events are flushed twice a second)
    item = split.execute(Request(request_id="r", prompt_token_ids=prefix + suffix))
    assert item.phase == ("colocated" if kv_events else "prefill"), split.decisions
    split.close()
