"""One request whose data makes the model fail ends alone; the rest of its batch goes on with the tokens they would
have had without it. The failure is injected where the model runs (`ModelRunner.execute`), for one request's id."""

from __future__ import annotations

import pytest

from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.engine.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_llama

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = {"a": [5, 6, 7, 8, 9], "poison": [10, 11, 12], "b": [13, 14, 15, 16]}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("isolation") / "llama")


def run(engine: LLMEngine, prompts: dict[str, list[int]]) -> dict[str, object]:
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def engine(model_path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_path), backend="cpu", block_size=4, num_kv_blocks=64))


def test_a_request_that_fails_the_model_ends_alone_and_its_batch_goes_on(model_path):
    clean = run(engine(model_path), {k: v for k, v in PROMPTS.items() if k != "poison"})
    poisoned = engine(model_path)
    execute = poisoned.runner.execute

    def failing_for_poison(batch):
        if any(seq.request_id == "poison" for seq in batch.seqs):
            raise RuntimeError("injected: this request's data breaks a kernel")
        return execute(batch)

    poisoned.runner.execute = failing_for_poison
    out = run(poisoned, PROMPTS)
    assert out["poison"].error == "RuntimeError: injected: this request's data breaks a kernel"
    assert out["poison"].outputs[0].finish_reason == "error"
    for rid in ("a", "b"):
        assert out[rid].error is None and out[rid].outputs[0].token_ids == clean[rid].outputs[0].token_ids
    blocks = poisoned.scheduler.block_manager
    assert not poisoned.has_unfinished_requests() and blocks.num_free_blocks == blocks.num_blocks


def test_a_step_that_fails_only_together_is_raised(model_path):
    """Not one request's doing (memory, a bug): the caller fails the whole batch."""
    broken = engine(model_path)
    execute = broken.runner.execute

    def failing_for_two(batch):
        if len(batch.seqs) > 1:
            raise MemoryError("injected: the batch does not fit")
        return execute(batch)

    broken.runner.execute = failing_for_two
    for rid, prompt in PROMPTS.items():
        broken.add_request(rid, prompt, GREEDY)
    with pytest.raises(MemoryError, match="does not fit"):
        broken.step()
