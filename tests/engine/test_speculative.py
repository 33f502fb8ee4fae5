"""Speculative decoding (n-gram prompt lookup) against the oracle and against plain decoding: greedy tokens identical
to transformers' on every step shape (whole prompts, chunked prefill, preemption), through a prefill/decode split, a
prefix hit, a resume and tensor and pipeline parallel engines; seeded sampling, penalties, logprobs, stop strings and
max_tokens the same with speculation on or off; a repetitive workload accepts proposals (fewer steps); a bad config
is refused when the engine is configured."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sagellm import SamplingParams
from sagellm.common.errors import FieldError
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.engine.prefix_hash import ROOT_HASH, hash_block
from sagellm.runtime.engine.speculative.config import parse_speculative_config
from sagellm.runtime.parallel.engine import start_engine
from tests.oracle import (
    ENGINE_BACKEND,
    STEP_SHAPES,
    finished_outputs,
    hf_greedy,
    random_prompts,
    run_to_end,
    step_shapes,
)
from tests.tiny_models import make_tiny_llama

# Not adaptive: every proposal verified, whatever this busy machine's step times say (SpecBudget has its own tests).
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
    "adaptive": False,
}
GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("spec") / "llama")
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def engine(path, speculative: bool, **overrides) -> LLMEngine:
    args = dict(model=str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=128) | overrides
    return LLMEngine(EngineConfig(**args, speculative_config=NGRAM if speculative else None))


def repetitive_prompts(vocab: int) -> list[list[int]]:
    """Prompts that repeat themselves (what prompt lookup is for) beside plain random ones."""
    a, b, c = random_prompts(vocab, [6, 5, 9], seed=3)
    return [a * 3, b * 3 + a[:2], c, c + c[:4]]  # at most 22 tokens: with 20 more, in the 48 of a preempting engine


def generate(eng: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]):
    """Each request's tokens, the whole outputs, and the steps taken."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), p, sp)
    outputs: dict[str, list] = {}
    steps = 0
    while eng.has_unfinished_requests():
        steps += 1
        for out in eng.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs, steps


@step_shapes
def test_greedy_tokens_identical_to_transformers_with_speculation(tiny, engine_args):
    path, hf = tiny
    prompts = repetitive_prompts(hf.config.vocab_size)
    eng = engine(path, True, **({"max_num_batched_tokens": 512} | engine_args))
    outputs, _ = generate(eng, prompts, GREEDY)
    for i, p in enumerate(prompts):
        assert outputs[str(i)][-1].outputs[0].token_ids == hf_greedy(hf, p, GREEDY.max_tokens)
    stats = eng.stats()
    assert 0 < stats.spec_decode_num_accepted_tokens <= stats.spec_decode_num_draft_tokens
    if "num_kv_blocks" in engine_args:  # the cache cannot hold them all: proposals give way, then sequences
        assert sum(outs[-1].metrics.num_preemptions for outs in outputs.values()) > 0


def test_the_adaptive_default_keeps_the_tokens_whatever_it_verifies(tiny):
    path, hf = tiny
    prompts = repetitive_prompts(hf.config.vocab_size)
    eng = LLMEngine(EngineConfig(model=str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=128,
                                 speculative_config={k: v for k, v in NGRAM.items() if k != "adaptive"}))  # fmt: skip
    tokens = run_to_end(_added(eng, prompts, GREEDY))
    for i, p in enumerate(prompts):
        assert tokens[str(i)] == hf_greedy(hf, p, GREEDY.max_tokens)
    assert eng.speculator.config.adaptive


def test_a_repetitive_workload_takes_fewer_steps_for_the_same_tokens(tiny):
    path, hf = tiny
    prompts = repetitive_prompts(hf.config.vocab_size)
    plain, plain_steps = generate(engine(path, False), prompts, GREEDY)
    fast, fast_steps = generate(engine(path, True), prompts, GREEDY)
    assert _tokens(fast) == _tokens(plain)
    assert fast_steps < plain_steps


def test_one_output_per_request_and_step_carries_all_its_accepted_tokens(tiny):
    path, hf = tiny
    outputs, _ = generate(engine(path, True), repetitive_prompts(hf.config.vocab_size)[:1], GREEDY)
    deltas = [o.outputs[0].token_ids_delta for o in outputs["0"]]
    assert max(len(d) for d in deltas) > 1
    assert sum(len(d) for d in deltas) == GREEDY.max_tokens
    texts = "".join(o.outputs[0].text_delta for o in outputs["0"])
    assert texts == outputs["0"][-1].outputs[0].text


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.2, frequency_penalty=0.3, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0, logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0, min_tokens=4),
    ],
    ids=["seeded", "penalties", "logprobs", "max_tokens", "min_tokens"],
)
def test_what_a_request_asks_is_the_same_with_speculation(tiny, params):
    path, hf = tiny
    prompts = repetitive_prompts(hf.config.vocab_size)
    plain, _ = generate(engine(path, False), prompts, params)
    fast, _ = generate(engine(path, True), prompts, params)
    for rid, outs in plain.items():
        mine, theirs = fast[rid][-1].outputs[0], outs[-1].outputs[0]
        assert mine.token_ids == theirs.token_ids and mine.finish_reason == theirs.finish_reason
        assert mine.text == theirs.text
        if params.logprobs:
            assert [lp.token_id for lp in mine.logprobs] == mine.token_ids
            for a, b in zip(mine.logprobs, theirs.logprobs):
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
                assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_a_stop_string_inside_accepted_tokens_ends_the_request_there(tiny):
    path, hf = tiny
    prompts = repetitive_prompts(hf.config.vocab_size)[:1]
    plain, _ = generate(engine(path, False), prompts, GREEDY)
    text = plain["0"][-1].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    want, _ = generate(engine(path, False), prompts, params)
    got, _ = generate(engine(path, True), prompts, params)
    assert got["0"][-1].outputs[0].text == want["0"][-1].outputs[0].text
    assert got["0"][-1].outputs[0].finish_reason == "stop"
    assert sum(len(o.outputs[0].token_ids_delta) for o in got["0"]) == len(got["0"][-1].outputs[0].token_ids)


def test_n_choices_and_a_prefix_hit_keep_greedy_tokens_identical(tiny):
    path, hf = tiny
    prompt = repetitive_prompts(hf.config.vocab_size)[0]
    eng = engine(path, True)
    first = run_to_end(_added(eng, [prompt], GREEDY))["0"]
    eng.add_request("again", prompt, GREEDY)
    again = run_to_end(eng)["again"]
    assert first == again == hf_greedy(hf, prompt, GREEDY.max_tokens)
    for choice in range(2):
        eng.add_request(f"c{choice}", prompt, GREEDY.choice(choice), group="g")
    choices = run_to_end(eng)
    assert choices["c0"] == choices["c1"] == first


def test_the_decode_worker_of_a_prefill_decode_split_speculates_with_identical_tokens(tiny):
    path, hf = tiny
    prompts = repetitive_prompts(hf.config.vocab_size)
    prefill, decode = engine(path, False), engine(path, True)
    for i, p in enumerate(prompts):
        prefill.add_request(str(i), p, GREEDY, prefill_only=True)
    firsts = [
        decode.add_prefilled_request(o.request_id, o.prompt_token_ids, GREEDY, o.outputs[0].token_ids[0], o.kv)
        for o in finished_outputs(prefill)
    ]
    tokens = run_to_end(decode, firsts)
    for i, p in enumerate(prompts):
        assert tokens[str(i)] == hf_greedy(hf, p, GREEDY.max_tokens)
    assert decode.stats().spec_decode_num_accepted_tokens > 0


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_a_parallel_engine_speculates_with_identical_greedy_tokens(tiny, tp, pp):
    path, hf = tiny
    prompts = repetitive_prompts(hf.config.vocab_size)
    config = EngineConfig(model=str(path), backend="cpu", block_size=4, num_kv_blocks=128, tensor_parallel_size=tp,
                          pipeline_parallel_size=pp, speculative_config=NGRAM)  # fmt: skip
    eng = start_engine(config)
    try:
        tokens = run_to_end(_added(eng, prompts, GREEDY))
        assert eng.stats().spec_decode_num_accepted_tokens > 0
    finally:
        eng.close()
    for i, p in enumerate(prompts):
        assert tokens[str(i)] == hf_greedy(hf, p, GREEDY.max_tokens)


def test_a_small_token_budget_verifies_fewer_proposals_and_agrees(tiny):
    path, hf = tiny
    prompts = repetitive_prompts(hf.config.vocab_size)
    eng = engine(path, True, **STEP_SHAPES["chunked"])
    tokens = run_to_end(_added(eng, prompts, GREEDY))
    for i, p in enumerate(prompts):
        assert tokens[str(i)] == hf_greedy(hf, p, GREEDY.max_tokens)


def test_prefix_hashes_only_ever_see_accepted_tokens(tiny):
    path, hf = tiny
    prompt = repetitive_prompts(hf.config.vocab_size)[1]
    eng = engine(path, True)
    out = run_to_end(_added(eng, [prompt], GREEDY))["0"]
    blocks = eng.scheduler.block_manager
    # Every cached block's hash is one of the accepted sequence's own blocks: a rejected proposal's never is.
    full, parent, expected = prompt + out, ROOT_HASH, set()
    for start in range(0, len(full) - 3, 4):
        parent = hash_block(parent, full[start : start + 4])
        expected.add(parent)
    assert set(blocks._cached) <= expected and blocks._cached


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"method": "medusa", "num_speculative_tokens": 2}, "a head trained on the target) is not supported"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, 'takes a draft "model"'),
        ({"method": "ngram", "model": "/some/draft", "num_speculative_tokens": 2}, 'takes a draft "model"'),
        ({"model": "/d", "num_speculative_tokens": 2, "prompt_lookup_max": 2}, "ngram's, not draft_model's"),
        ({"method": "lookahead", "num_speculative_tokens": 2}, "unknown method 'lookahead'"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an int in 1..16"),
        ({"method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens must be an int in 1..16"),
        ({"method": "ngram"}, "num_speculative_tokens must be an int"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "<="),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": "3"}, "must be an int"),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}, "unknown key"),
        ({"method": "ngram", "num_speculative_tokens": 2, "adaptive": "yes"}, "adaptive must be true or false"),
    ],
)
def test_a_bad_config_is_refused_naming_what_is_wrong(raw, message):
    with pytest.raises(FieldError, match="speculative_config") as error:
        EngineConfig(model="x", speculative_config=raw)
    assert message in str(error.value)


def test_vllm_defaults_for_the_lookup_lengths():
    both = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3})
    assert (both.prompt_lookup_min, both.prompt_lookup_max) == (5, 5)
    high = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (high.prompt_lookup_min, high.prompt_lookup_max) == (4, 4)


def _added(eng: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> LLMEngine:
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    return eng


def _tokens(outputs: dict[str, list]) -> dict[str, list[int]]:
    return {rid: outs[-1].outputs[0].token_ids for rid, outs in outputs.items()}


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    """Another tiny model with the target's tokenizer: its guesses are often wrong."""
    return make_tiny_llama(tmp_path_factory.mktemp("draft") / "draft", seed=7, num_hidden_layers=1)


def draft_config(path, k: int = 3) -> dict:
    return {"model": str(path), "num_speculative_tokens": k, "adaptive": False}


@pytest.mark.parametrize("draft", ["itself", "another"])
def test_a_draft_model_keeps_greedy_tokens_identical_to_transformers(tiny, other_draft, draft):
    path, hf = tiny
    prompts = random_prompts(hf.config.vocab_size, [5, 17, 9, 30], seed=5)
    draft_path = path if draft == "itself" else other_draft
    eng = LLMEngine(EngineConfig(model=str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=128,
                                 speculative_config=draft_config(draft_path)))  # fmt: skip
    outputs, steps = generate(eng, prompts, GREEDY)
    for i, p in enumerate(prompts):
        assert outputs[str(i)][-1].outputs[0].token_ids == hf_greedy(hf, p, GREEDY.max_tokens)
    stats = eng.stats()
    if draft == "itself":  # the target's own guesses: every one accepted
        assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens > 0
        assert steps < GREEDY.max_tokens
    draft = eng.speculator.proposer  # every shadow and its blocks let go once its request ended
    assert not draft._shadows and draft.blocks.num_free_blocks == draft.blocks.num_blocks


def test_a_draft_model_under_preemption_and_seeded_sampling_agrees(tiny, other_draft):
    path, hf = tiny
    prompts = repetitive_prompts(hf.config.vocab_size)
    seeded = SamplingParams(max_tokens=20, temperature=0.8, seed=5, ignore_eos=True)
    plain, _ = generate(engine(path, False, **STEP_SHAPES["preempted"]), prompts, seeded)
    eng = LLMEngine(EngineConfig(model=str(path), backend=ENGINE_BACKEND, block_size=4, **STEP_SHAPES["preempted"],
                                 speculative_config=draft_config(other_draft)))  # fmt: skip
    fast, _ = generate(eng, prompts, seeded)
    assert _tokens(fast) == _tokens(plain)
    assert sum(outs[-1].metrics.num_preemptions for outs in fast.values()) > 0


def test_a_draft_with_another_tokenizer_is_refused_at_start(tiny, tmp_path):
    path, _ = tiny
    draft = make_tiny_llama(tmp_path / "draft")
    tokenizer = AutoTokenizer.from_pretrained(draft)
    tokenizer.add_tokens(["<draft-only>"])  # one token more: other ids than the target's
    tokenizer.save_pretrained(draft)
    with pytest.raises(FieldError, match="tokenizer is not the target model's"):
        LLMEngine(
            EngineConfig(model=str(path), backend="cpu", num_kv_blocks=32, speculative_config=draft_config(draft))
        )


def test_a_resumed_request_speculates_on_and_continues_as_if_it_had_not_stopped(tiny):
    path, hf = tiny
    prompt = repetitive_prompts(hf.config.vocab_size)[0]
    whole = hf_greedy(hf, prompt, GREEDY.max_tokens)
    eng = engine(path, True)
    rest = SamplingParams(max_tokens=GREEDY.max_tokens - 6, temperature=0, ignore_eos=True)
    eng.add_request("resumed", prompt + whole[:6], rest, resumed_tokens=6)
    assert run_to_end(eng)["resumed"] == whole[6:]
    assert eng.stats().spec_decode_num_accepted_tokens > 0


def test_a_guided_request_beside_speculating_ones_decodes_as_without_speculation(tiny):
    path, hf = tiny
    prompts = repetitive_prompts(hf.config.vocab_size)
    guided = SamplingParams(max_tokens=20, temperature=0, guided=GuidedDecoding(regex=r"[a-z ]{4,30}"))
    params = [guided, GREEDY, GREEDY, guided]
    plain, _ = generate(engine(path, False), prompts, params)
    fast, _ = generate(engine(path, True), prompts, params)
    assert _tokens(fast) == _tokens(plain)
    assert re.fullmatch(r"[a-z ]{4,30}", fast["0"][-1].outputs[0].text)
