"""Disaggregated prefill/decode at the engine level: a prefill-only engine hands its prompt KV to a second engine,
which continues with greedy tokens identical to one engine doing both (and to the oracle's, through that test)."""

from __future__ import annotations

import pytest
import torch

from sagellm import SamplingParams
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from tests.oracle import finished_outputs, run_to_end
from tests.tiny_models import make_tiny_llama

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("pd") / "llama")


def engine(path, **overrides) -> LLMEngine:
    args = dict(model=str(path), backend="cpu", block_size=4, num_kv_blocks=128) | overrides
    return LLMEngine(EngineConfig(**args))


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 200, (8,), generator=g).tolist()  # two blocks: later prompts share a cached prefix
    return [shared + torch.randint(3, 200, (n,), generator=g).tolist() for n in lengths]


def colocated(path, batch: list[list[int]]) -> dict[str, list[int]]:
    eng = engine(path)
    for i, p in enumerate(batch):
        eng.add_request(str(i), p, GREEDY)
    return run_to_end(eng)


def prefill_then_decode(path, batch: list[list[int]], **decode_overrides) -> tuple[dict[str, list[int]], list[int]]:
    """The tokens of each request, and how many prompt tokens of each the decode engine took as imported KV."""
    prefill, decode = engine(path), engine(path, **decode_overrides)
    for i, p in enumerate(batch):
        prefill.add_request(str(i), p, GREEDY, prefill_only=True)
    handed = finished_outputs(prefill)
    assert all(o.outputs[0].finish_reason == "prefilled" and o.kv is not None for o in handed)
    assert not prefill.scheduler.block_manager.num_blocks - prefill.scheduler.block_manager.num_free_blocks
    firsts, imported = [], []
    for o in handed:
        assert o.kv.shape[:3] == (2, 2, len(o.prompt_token_ids))  # [layers, k/v, tokens, Hk, D]
        first = o.outputs[0].token_ids[0]
        firsts.append(decode.add_prefilled_request(o.request_id, o.prompt_token_ids, GREEDY, first, o.kv))
        imported.append(decode._requests[o.request_id].seq.num_computed_tokens)
    return run_to_end(decode, firsts), imported


def test_decode_worker_continues_with_identical_greedy_tokens(model_path):
    batch = prompts([1, 8, 5, 13])  # prompt lengths 9, 16 (a whole number of blocks), 13, 21
    tokens, imported = prefill_then_decode(model_path, batch)
    assert imported == [len(p) for p in batch]
    assert tokens == colocated(model_path, batch)


def test_without_room_for_the_kv_the_decode_worker_recomputes_and_still_agrees(model_path):
    batch = prompts([17, 17])  # 25 tokens each, the first 8 shared
    # 9 blocks of 4 tokens: the first prompt takes 7, the second needs 5 more than the 2 it shares: recomputed.
    tokens, imported = prefill_then_decode(model_path, batch, num_kv_blocks=9, max_num_seqs=1)
    assert imported == [25, 0]
    assert tokens == colocated(model_path, batch)


def test_a_request_finished_by_its_first_token_ends_at_the_prefill_worker(model_path):
    eng = engine(model_path)
    eng.add_request("one", prompts([4])[0], SamplingParams(max_tokens=1, temperature=0), prefill_only=True)
    (out,) = finished_outputs(eng)
    assert out.outputs[0].finish_reason == "length" and out.kv is None


def test_kv_for_the_wrong_prompt_length_is_refused(model_path):
    eng = engine(model_path)
    with pytest.raises(ValueError, match="KV covers 3 tokens, the prompt has 5"):
        eng.add_prefilled_request("x", [5, 6, 7, 8, 9], GREEDY, 11, torch.zeros(2, 2, 3, 2, 16))
    assert not eng.has_unfinished_requests()


def test_seeded_sampling_is_the_same_split_over_prefill_and_decode_or_resumed_elsewhere(model_path):
    """A seeded request draws each token from (seed, position): the same tokens from one engine, from a prefill
    worker then a decode worker, and from a second engine given the prompt and the first tokens (a resume)."""
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    (prompt,) = prompts([9])
    one = engine(model_path)
    one.add_request("r", prompt, sampled)
    whole = run_to_end(one)["r"]
    assert len(set(whole)) > 3  # really sampled, not one token over and over

    prefill, decode = engine(model_path), engine(model_path)
    prefill.add_request("r", prompt, sampled, prefill_only=True)
    (handed,) = finished_outputs(prefill)
    first = handed.outputs[0].token_ids[0]
    decode.add_prefilled_request("r", handed.prompt_token_ids, sampled, first, handed.kv)
    assert [first, *run_to_end(decode)["r"]] == whole

    resumed = engine(model_path)
    rest = SamplingParams(max_tokens=7, temperature=1.0, seed=1234, ignore_eos=True)
    resumed.add_request("r", prompt + whole[:5], rest)
    assert whole[:5] + run_to_end(resumed)["r"] == whole
