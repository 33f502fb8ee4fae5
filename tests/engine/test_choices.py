"""A request's n choices in the engine: the prompt prefilled once and its KV blocks held once (the other choices wait
for it, then share its full blocks and compute only the last, partial one), each choice seeded `seed + index`:
greedy choices equal transformers' tokens, sampled ones are reproducible and equal a single request with that seed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from tests.oracle import hf_greedy, random_prompts
from tests.tiny_models import make_tiny_llama

BLOCK = 4
PROMPT_LEN = 21  # 5 full blocks and one token


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("llama") / "llama")
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny) -> LLM:
    return LLM(str(tiny[0]), backend="cpu", block_size=BLOCK, num_kv_blocks=64)


def test_greedy_choices_are_identical_and_equal_transformers(tiny, llm):
    _, hf = tiny
    prompt = random_prompts(hf.config.vocab_size, [PROMPT_LEN])[0]
    out = llm.generate([prompt], SamplingParams(n=4, max_tokens=8, temperature=0, ignore_eos=True, seed=3))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(c.token_ids == hf_greedy(hf, prompt, 8) for c in out.outputs)


def test_sampled_choices_are_reproducible_and_each_is_its_seed(tiny, llm):
    _, hf = tiny
    prompt = random_prompts(hf.config.vocab_size, [PROMPT_LEN], seed=4)[0]
    params = SamplingParams(n=4, max_tokens=10, temperature=1.0, ignore_eos=True, seed=11)
    first = [c.token_ids for c in llm.generate([prompt], params)[0].outputs]
    assert first == [c.token_ids for c in llm.generate([prompt], params)[0].outputs]
    assert len({tuple(ids) for ids in first}) == 4
    alone = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True, seed=13)
    assert llm.generate([prompt], alone)[0].outputs[0].token_ids == first[2]  # choice 2 is seed + 2


def _blocks_when_all_run(engine: LLMEngine, prompt: list[int], group: str | None) -> tuple[int, list]:
    """Adds 4 choices of `prompt` and steps until each has its first token: the KV blocks then in use, and the
    choices' outputs so far."""
    params = SamplingParams(n=4, max_tokens=4, temperature=1.0, ignore_eos=True, seed=5)
    for i in range(4):
        engine.add_request(f"{group or 'alone'}-{i}", prompt, params.choice(i), group=group)
    firsts: dict[str, object] = {}
    while len(firsts) < 4:
        for out in engine.step():
            firsts.setdefault(out.request_id, out)
    used = engine.scheduler.block_manager.num_blocks - engine.scheduler.block_manager.num_free_blocks
    while engine.has_unfinished_requests():
        engine.step()
    return used, list(firsts.values())


def test_the_prompt_blocks_are_allocated_once(tiny):
    path, hf = tiny
    engine = LLMEngine(EngineConfig(model=str(path), backend="cpu", block_size=BLOCK, num_kv_blocks=64))
    grouped, outs = _blocks_when_all_run(engine, random_prompts(hf.config.vocab_size, [PROMPT_LEN], seed=6)[0], "g")
    engine.scheduler.block_manager.reset_prefix_cache()
    apart, _ = _blocks_when_all_run(engine, random_prompts(hf.config.vocab_size, [PROMPT_LEN], seed=7)[0], None)
    full = PROMPT_LEN // BLOCK
    assert grouped == full + 4  # the 5 full prompt blocks once, and each choice's own last block
    assert apart == 4 * (full + 1)
    assert sorted(o.metrics.num_cached_tokens for o in outs) == [0, 20, 20, 20]  # only the first computed them


def test_n_out_of_range_is_refused():
    with pytest.raises(ValueError, match="n must be an integer in"):
        SamplingParams(n=17)
