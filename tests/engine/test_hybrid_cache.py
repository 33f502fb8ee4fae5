"""The engine's cache for a model with recurrent layers (Qwen3.5), against transformers on the paths where its
states could go wrong: a prefix hit that leaves one token (a decode row that starts from the checkpoint), one-token
prompts in slots earlier sequences used, preemption under a cache too small for the batch (recomputed from zero
states), the prefix-cache hits counted in the metrics, and a prefill worker's states handed to a decode worker."""

from __future__ import annotations

import msgspec
import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.gateway.serving.kv_outbox import KVPayload
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.engine.state_cache import allocate_state_caches
from sagellm.runtime.models.loader import load_model
from tests import tiny_models
from tests.oracle import ENGINE_BACKEND, finished_outputs, hf_greedy, random_prompts, run_to_end, step_shapes

ENGINE = dict(backend=ENGINE_BACKEND, block_size=4)
TOKENS = 24
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory):
    path = tiny_models.make_tiny_qwen3_5(tmp_path_factory.mktemp("qwen3_5") / "hf")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def test_a_hit_leaving_one_token_decodes_from_the_checkpoint(qwen3_5):
    path, hf = qwen3_5
    llm = LLM(str(path), num_kv_blocks=200, **ENGINE)
    (first,) = random_prompts(hf.config.vocab_size, [13])  # its states are kept after 12 tokens
    llm.generate([first], GREEDY)
    again = first[:12] + [first[12] % (hf.config.vocab_size - 3) + 3]  # 12 cached, one token to compute
    out = llm.generate([again], GREEDY)[0]
    assert out.metrics.num_cached_tokens == 12
    assert out.outputs[0].token_ids == hf_greedy(hf, again, TOKENS)
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits >= 3  # the hit's three blocks, counted where the metrics read them


def test_one_token_prompts_in_used_slots_start_from_zero_states(qwen3_5):
    path, hf = qwen3_5
    llm = LLM(str(path), num_kv_blocks=200, max_num_seqs=2, **ENGINE)
    prompts = random_prompts(hf.config.vocab_size, [9, 1, 1, 7, 1], seed=3)
    outs = llm.generate(prompts, GREEDY)  # two seats: later prompts take seats earlier ones wrote
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, TOKENS) for p in prompts]


def test_preempted_sequences_recompute_their_states(qwen3_5):
    path, hf = qwen3_5
    llm = LLM(str(path), num_kv_blocks=24, max_num_seqs=4, **ENGINE)  # 96 tokens for 4 x (10 + 24): preemption
    prompts = random_prompts(hf.config.vocab_size, [10, 9, 11, 8], seed=5)
    outs = llm.generate(prompts, GREEDY)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, TOKENS) for p in prompts]


def test_a_decode_worker_continues_from_the_prefill_workers_states(qwen3_5):
    """Prefill/decode in two engines: the prefill worker hands over the prompt's KV and its recurrent states (as
    they are, or through the KV outbox's payload, as between servers with `kv_transfer_params`), the decode worker
    imports both (nothing recomputed) and decodes transformers' tokens; without the states it recomputes the prompt,
    and agrees too."""
    path, hf = qwen3_5
    prompts = random_prompts(hf.config.vocab_size, [9, 16, 21, 1], seed=7)
    prefill = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=200, **ENGINE))
    for i, p in enumerate(prompts):
        prefill.add_request(str(i), p, GREEDY, prefill_only=True)
    handed = finished_outputs(prefill)
    assert all(o.states is not None and o.kv.shape[0] == 2 for o in handed)  # two attention layers' KV
    for way in ("handed", "between servers", "without states"):
        decode = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=200, **ENGINE))
        firsts, imported = [], []
        for o in handed:
            first, kv, states = o.outputs[0].token_ids[0], o.kv, o.states if way != "without states" else None
            if way == "between servers":
                payload = msgspec.msgpack.encode(KVPayload.of(o.prompt_token_ids, first, kv, states))
                fetched = msgspec.msgpack.decode(payload, type=KVPayload).prefilled()
                kv, states = fetched.kv.data, fetched.kv.states
            firsts.append(decode.add_prefilled_request(o.request_id, o.prompt_token_ids, GREEDY, first, kv,
                                                       states=states))  # fmt: skip
            imported.append(decode._requests[o.request_id].seq.num_computed_tokens)
        tokens = run_to_end(decode, firsts)
        assert imported == [len(o.prompt_token_ids) if way != "without states" else 0 for o in handed]
        assert [tokens[str(i)] for i in range(len(prompts))] == [hf_greedy(hf, p, TOKENS) for p in prompts]


def test_states_of_another_size_are_refused_with_the_request_alone(qwen3_5):
    path, hf = qwen3_5
    prefill = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=64, **ENGINE))
    prefill.add_request("p", random_prompts(hf.config.vocab_size, [6])[0], GREEDY, prefill_only=True)
    (handed,) = finished_outputs(prefill)
    decode = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=64, **ENGINE))
    with pytest.raises(ValueError, match="recurrent states of 10 values"):
        decode.add_prefilled_request("p", handed.prompt_token_ids, GREEDY, 5, handed.kv, states=torch.zeros(10))
    assert not decode.has_unfinished_requests()


NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1,
         "adaptive": False}  # fmt: skip


@step_shapes
def test_speculation_rolls_the_states_back_past_rejected_proposals(qwen3_5, engine_args):
    """n-gram proposals (this tiny model's text never repeats its prompt: every one rejected) verified as a chunk
    from the sequence's states, which then go back to those kept after the sequence's own tokens; greedy tokens
    stay transformers' on every step shape."""
    path, hf = qwen3_5
    a, b, c = random_prompts(hf.config.vocab_size, [6, 5, 9], seed=3)
    prompts = [a * 3, b * 3 + a[:2], c, c + c[:4]]  # repetitive: prompt lookup finds something to propose
    config = {"max_num_batched_tokens": 512, "num_kv_blocks": 200} | engine_args
    engine = LLMEngine(EngineConfig(model=str(path), speculative_config=NGRAM, **ENGINE, **config))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    tokens = run_to_end(engine, [])
    assert [tokens[str(i)] for i in range(len(prompts))] == [hf_greedy(hf, p, TOKENS) for p in prompts]
    assert engine.stats().spec_decode_num_draft_tokens > 0


def test_a_qwen3_5_draft_of_itself_has_every_guess_accepted_and_the_same_tokens(qwen3_5):
    """The model as its own draft (its states in the draft's slots, back at each catch-up): every guess accepted,
    in fewer steps, and transformers' tokens."""
    path, hf = qwen3_5
    prompts = random_prompts(hf.config.vocab_size, [5, 17, 9, 1], seed=5)
    draft = {"model": str(path), "num_speculative_tokens": 3, "adaptive": False}
    engine = LLMEngine(EngineConfig(model=str(path), speculative_config=draft, num_kv_blocks=200, **ENGINE))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    steps, tokens = 0, {}
    while engine.has_unfinished_requests():
        steps += 1
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids_delta)
    assert [tokens[str(i)] for i in range(len(prompts))] == [hf_greedy(hf, p, TOKENS) for p in prompts]
    stats = engine.stats()
    assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens > 0
    assert steps < TOKENS


def test_seeded_sampling_with_partly_accepted_guesses_draws_what_plain_decoding_draws(qwen3_5):
    """Sampled tokens against the draft's greedy guesses: some guesses kept, some not, so the states roll back to
    the last catch-up and the kept guesses are computed again; the draws are those of plain decoding."""
    path, hf = qwen3_5
    prompts = random_prompts(hf.config.vocab_size, [5, 17, 9, 1], seed=5)
    seeded = SamplingParams(max_tokens=TOKENS, temperature=0.5, seed=11, ignore_eos=True)
    draft = {"model": str(path), "num_speculative_tokens": 3, "adaptive": False}
    runs = {}
    for speculative in (None, draft):
        engine = LLMEngine(EngineConfig(model=str(path), speculative_config=speculative, num_kv_blocks=200, **ENGINE))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, seeded)
        runs[speculative is not None] = run_to_end(engine, [])
    assert runs[True] == runs[False]
    stats = engine.stats()
    assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens


def test_the_states_are_allocated_on_an_accelerators_device(qwen3_5):
    """Off the CPU the states are torch.zeros on the device (found on a GPU: the dtype was passed as torch.zeros
    cannot take it); the meta device takes that path here."""
    config = load_model(qwen3_5[0], load_tokenizer=False, load_weights=False).config
    caches = allocate_state_caches(config, 3, torch.device("meta"))
    assert len(caches) == config.num_linear_layers
    assert all(t.device.type == "meta" and t.dtype == torch.float32 and t.shape[0] == 3 for c in caches for t in c)
