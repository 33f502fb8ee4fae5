"""Pipeline parallel engines against the oracle: PP=2 (layers in two processes, the hidden state passed with
send/recv) and TP=2 x PP=2 (four processes) give transformers' logits within fp32 tolerance and its greedy tokens
exactly, through chunked prefill and a continuous batch, on a tiny random Llama with 3 layers (stages of 2 + 1) and
on SmolLM2-135M; a prompt's KV leaves a split engine whole and arrives whole in one; a split the model cannot take
is refused before any rank starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.parallel.engine import start_engine
from tests.oracle import (
    assert_greedy_through_a_prefix_hit_and_proposals,
    assert_last_logits_match,
    finished_outputs,
    hf_greedy,
    random_prompts,
    run_to_end,
)
from tests.tiny_models import make_tiny_llama, make_tiny_qwen3_5

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SPLITS = [(1, 2), (2, 2)]  # (tp, pp)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("pp") / "llama", num_hidden_layers=3)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def config(path: Path, tp: int, pp: int, **settings) -> EngineConfig:
    return EngineConfig(model=str(path), backend="cpu", block_size=4, num_kv_blocks=64, tensor_parallel_size=tp,
                        pipeline_parallel_size=pp, **settings)  # fmt: skip


@pytest.mark.parametrize(("tp", "pp"), SPLITS, ids=lambda v: str(v))
def test_logits_and_greedy_tokens_equal_transformers(tiny, tp, pp):
    path, hf = tiny
    engine = start_engine(config(path, tp, pp, max_num_batched_tokens=16))  # prompts of 30 prefill in chunks
    try:
        assert_last_logits_match(engine, hf, random_prompts(hf.config.vocab_size, [1, 7, 16], seed=1))
        batch = random_prompts(hf.config.vocab_size, [5, 12, 30], seed=1)
        for i, p in enumerate(batch):
            engine.add_request(f"greedy-{i}", p, GREEDY)
        tokens = run_to_end(engine)
        for i, p in enumerate(batch):
            assert tokens[f"greedy-{i}"] == hf_greedy(hf, p, GREEDY.max_tokens)
    finally:
        engine.close()


def test_a_prompts_kv_moves_from_a_tp2_pp2_engine_to_a_whole_one_and_back(tiny):
    path, hf = tiny
    split, whole = start_engine(config(path, 2, 2)), start_engine(config(path, 1, 1))
    try:
        for prefill, decode in ((split, whole), (whole, split)):
            batch = random_prompts(hf.config.vocab_size, [9, 14], seed=1)
            for i, p in enumerate(batch):
                prefill.add_request(f"pd-{i}", p, GREEDY, prefill_only=True)
            handed = finished_outputs(prefill)
            for o in handed:
                assert o.kv.shape[:2] == (hf.config.num_hidden_layers, 2)  # every layer, whichever side is split
                assert o.kv.shape[3] == hf.config.num_key_value_heads
                decode.add_prefilled_request(o.request_id, o.prompt_token_ids, GREEDY, o.outputs[0].token_ids[0], o.kv)
            tokens = run_to_end(decode)
            for i, p in enumerate(batch):
                expected = hf_greedy(hf, p, GREEDY.max_tokens)
                assert [expected[0], *tokens[f"pd-{i}"]] == expected
    finally:
        split.close()
        whole.close()


def test_more_stages_than_layers_is_refused_before_any_rank_starts(tiny):
    path, _ = tiny
    with pytest.raises(ValueError, match="pipeline parallel size 4 is more than the model's 3 layers"):
        start_engine(config(path, 1, 4))


@pytest.mark.network
@pytest.mark.slow
def test_smollm2_pp2_and_tp2_pp2_greedy_equal_one_process(smollm2_dir: Path):
    chats = [[{"role": "user", "content": "What is the capital of France?"}]]
    tokens = {}
    for tp, pp in ((1, 1), (1, 2), (2, 2)):
        llm = LLM(str(smollm2_dir), backend="cpu", tensor_parallel_size=tp, pipeline_parallel_size=pp)
        try:
            tokens[tp, pp] = llm.chat(chats, SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].token_ids
        finally:
            llm.engine.close()
    assert tokens[1, 2] == tokens[1, 1] and tokens[2, 2] == tokens[1, 1]


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory):
    path = make_tiny_qwen3_5(tmp_path_factory.mktemp("pp") / "qwen3_5")
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_qwen3_5_in_two_stages_each_holding_its_layers_states(qwen3_5):
    """Qwen3.5 (Gated DeltaNet and attention layers) in two stages, each with its own layers' state slots: chunked
    prefill and a continuous batch give transformers' tokens; a prefix hit restores each stage's checkpoint; a
    prompt's KV and states leave the split engine whole and go on in a whole one; proposals rejected roll every
    stage's states back (n-gram: this model's text never repeats its prompt)."""
    path, hf = qwen3_5
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "adaptive": False}
    split = start_engine(config(path, 1, 2, max_num_batched_tokens=16, speculative_config=ngram))
    whole = start_engine(config(path, 1, 1))
    try:
        batch = assert_greedy_through_a_prefix_hit_and_proposals(split, hf, GREEDY)
        split.add_request("pd", batch[1], GREEDY, prefill_only=True)
        (handed,) = finished_outputs(split)
        assert handed.states is not None and handed.states.numel() == whole.runner.states_size
        first = handed.outputs[0].token_ids[0]
        whole.add_prefilled_request("pd", handed.prompt_token_ids, GREEDY, first, handed.kv, states=handed.states)
        assert whole._requests["pd"].seq.num_computed_tokens == len(batch[1])  # imported, not recomputed
        assert [first, *run_to_end(whole)["pd"]] == hf_greedy(hf, batch[1], GREEDY.max_tokens)
    finally:
        split.close()
        whole.close()
