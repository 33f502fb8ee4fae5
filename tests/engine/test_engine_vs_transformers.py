"""The engine against the oracle: logits and greedy tokens equal Hugging Face transformers on the same weights,
through chunked prefill, forced preemption and prefix-cache hits, for Llama and Qwen2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from tests.oracle import ENGINE_BACKEND, assert_last_logits_match, hf_greedy, random_prompts, step_shapes
from tests.tiny_models import make_tiny_llama, make_tiny_qwen2

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    make = make_tiny_llama if request.param == "llama" else make_tiny_qwen2
    path = make(tmp_path_factory.mktemp(request.param) / request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def test_prefill_logits_match_transformers_for_a_mixed_batch(tiny):
    path, hf = tiny
    engine = LLMEngine(EngineConfig(model=str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64))
    batch_prompts = random_prompts(hf.config.vocab_size, [1, 7, 16, 23])
    assert_last_logits_match(engine, hf, batch_prompts)


@step_shapes
def test_greedy_tokens_identical_to_transformers(tiny, engine_args):
    path, hf = tiny
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, **({"num_kv_blocks": 64} | engine_args))
    batch_prompts = random_prompts(hf.config.vocab_size, [5, 30, 17, 9])
    outs = llm.generate(batch_prompts, GREEDY)
    for p, out in zip(batch_prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 12)
        assert out.outputs[0].finish_reason == "length"
    if "num_kv_blocks" in engine_args:
        assert sum(o.metrics.num_preemptions for o in outs) > 0


def test_prefix_cache_hits_keep_greedy_tokens_identical(tiny):
    path, hf = tiny
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64)
    shared = random_prompts(hf.config.vocab_size, [21], seed=1)[0]
    suffixes = random_prompts(hf.config.vocab_size, [3, 6, 1], seed=2)
    first = llm.generate([shared + suffixes[0]], GREEDY)[0]
    assert first.metrics.num_cached_tokens == 0
    rest = llm.generate([shared + s for s in suffixes[1:]], GREEDY)
    for s, out in zip(suffixes[1:], rest):
        assert out.metrics.num_cached_tokens == 20  # 5 full blocks of the shared 21 tokens
        assert out.outputs[0].token_ids == hf_greedy(hf, shared + s, 12)


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny):
    path, hf = tiny
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64)
    p = random_prompts(hf.config.vocab_size, [8])[0]
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate([p], seeded)[0].outputs[0].token_ids
    others = random_prompts(hf.config.vocab_size, [3, 12], seed=5)
    crowd = llm.generate([others[0], p, others[1]], [SamplingParams(max_tokens=10), seeded, GREEDY])
    assert crowd[1].outputs[0].token_ids == alone


def test_stop_token_ids_max_tokens_and_logprobs(tiny):
    path, hf = tiny
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64)
    p = random_prompts(hf.config.vocab_size, [6])[0]
    reference = hf_greedy(hf, p, 12)
    stop_at = reference[4]
    out = llm.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_at]))
    first_stop = reference.index(stop_at)
    assert out[0].outputs[0].token_ids == reference[: first_stop + 1]
    assert (out[0].outputs[0].finish_reason, out[0].outputs[0].stop_reason) == ("stop", stop_at)
    out = llm.generate([p], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2))[0].outputs[0]
    assert out.token_ids == reference[:3] and len(out.logprobs) == 3
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and len(lp.top) == 2 and lp.top[0][0] == token  # greedy = most likely


def test_stream_deltas_add_up_to_the_text(tiny):
    path, _ = tiny
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64)
    deltas, last = [], None
    for out in llm.stream("Hello world!", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)):
        deltas.append(out.outputs[0].text_delta)
        last = out
    assert last.finished and "".join(deltas) == last.outputs[0].text
    assert len(last.outputs[0].token_ids) == 10


def test_chat_applies_the_template(tiny):
    path, _ = tiny
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64)
    out = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=4, temperature=0))[0]
    expected = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert out.prompt_token_ids == list(expected)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "prompt is empty"),
        ([10**9], "prompt_token_ids must be in"),
        ([1.5, 2.0], "prompt_token_ids must be integers"),
        (list(range(3, 300)), "this engine's context is 256 tokens"),
    ],
)
def test_bad_prompts_are_refused_with_a_clear_error(tiny, prompt, message):
    path, _ = tiny
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64)
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_unknown_engine_argument_names_the_choices(tiny):
    path, _ = tiny
    with pytest.raises(TypeError, match="unknown engine argument"):
        LLM(str(path), max_batch=3)
