"""Expert parallel engines against the oracle: a tiny random Mixtral, a Qwen3-MoE (q/k norms, its experts under
Qwen's names) and a gpt-oss (sinks, biases: the output projection's added once), each of 4 experts, 2 per token,
over 2 ranks (rank 0 here, rank 1 a real process, gloo between them), each holding 2 whole experts and the whole
router, attention split by heads as tensor parallel splits it, gives transformers' logits within fp32 tolerance and
the greedy tokens of transformers and of one rank through a continuous batch; a size with fewer experts than ranks is
refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import SamplingParams
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.models.decoder_graph import build_decoder_graph
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.tensor_parallel import TensorShard, shard_tensor_parallel
from sagellm.runtime.parallel.engine import start_engine
from tests.oracle import assert_last_logits_match, hf_greedy, random_prompts, run_to_end
from tests.tiny_models import make_tiny_gpt_oss, make_tiny_mixtral, make_tiny_qwen3_moe

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


MAKERS = {"mixtral": make_tiny_mixtral, "qwen3_moe": make_tiny_qwen3_moe,
          "gpt_oss": lambda path: make_tiny_gpt_oss(path, num_hidden_layers=2)}  # fmt: skip


@pytest.fixture(scope="module", params=list(MAKERS))
def tiny(request, tmp_path_factory):
    path = MAKERS[request.param](tmp_path_factory.mktemp(request.param) / request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def engine_config(path, tp: int, **extra) -> EngineConfig:
    return EngineConfig(
        model=str(path), backend="cpu", block_size=4, num_kv_blocks=64, tensor_parallel_size=tp, **extra
    )


@pytest.fixture(scope="module")
def ep2(tiny):
    engine = start_engine(engine_config(tiny[0], 2, max_num_batched_tokens=8))  # chunked: prefills beside decodes
    yield engine
    engine.close()


def test_each_rank_routes_over_every_expert_and_computes_its_own_then_all_reduces(tiny):
    config = load_model(tiny[0], load_tokenizer=False, load_weights=False).config
    for rank, held in enumerate([(0, 2), (2, 4)]):
        graph = shard_tensor_parallel(build_decoder_graph(config), config, TensorShard(rank, 2))
        moes = [node for node in graph.nodes.values() if node.op == "moe"]
        assert [(n.params["experts"], n.params["num_experts"]) for n in moes] == [(held, 4)] * config.num_layers
        readers = {e.src: graph.nodes[e.dst].op for e in graph.edges}
        assert all(readers[n.id] == "all_reduce" for n in moes)


def test_rank_0_holds_only_its_experts(ep2):
    stacked = [instr.consts[0].gate_up for instr in ep2.runner.plan.instrs if instr.node.startswith("moe")]
    inter = ep2.model.config.intermediate_size  # an expert's: Mixtral's 128, Qwen3-MoE's moe_intermediate_size 32
    assert [tuple(gate_up.shape) for gate_up in stacked] == [(2, 2 * inter, 64)] * 2  # [L, 2I, H], each layer


def test_ep2_prefill_logits_match_transformers(tiny, ep2):
    _, hf = tiny
    batch_prompts = random_prompts(hf.config.vocab_size, [1, 7, 16, 23])
    assert_last_logits_match(ep2, hf, batch_prompts)


def test_ep2_greedy_tokens_equal_ep1_and_transformers_in_a_continuous_batch(tiny, ep2):
    path, hf = tiny
    batch_prompts = random_prompts(hf.config.vocab_size, [5, 12, 30])
    ep1 = start_engine(engine_config(path, 1, max_num_batched_tokens=8))
    tokens = {}
    try:
        for engine in (ep1, ep2):
            for i, p in enumerate(batch_prompts):
                engine.add_request(f"greedy-{i}", p, GREEDY)
            finished = {}
            while engine.has_unfinished_requests():
                finished.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
            tokens[engine is ep2] = [finished[f"greedy-{i}"] for i in range(len(batch_prompts))]
    finally:
        ep1.close()
    assert tokens[True] == tokens[False] == [hf_greedy(hf, p, GREEDY.max_tokens) for p in batch_prompts]


def test_more_ranks_than_experts_is_refused_before_any_rank_starts(tmp_path):
    path = make_tiny_mixtral(tmp_path / "two", num_local_experts=2, num_experts_per_tok=1, num_key_value_heads=4)
    with pytest.raises(ValueError, match="more than the model's 2 experts"):
        start_engine(engine_config(path, 3))


def test_ep2_with_speculation_keeps_greedy_tokens_equal_transformers(tiny):
    path, hf = tiny
    if path.name == "gpt_oss":
        pytest.skip("the tiny gpt-oss's greedy text never repeats its prompt: prompt lookup has nothing to guess")
    a, b = random_prompts(hf.config.vocab_size, [6, 7], seed=4)
    batch = [a * 3, b + b, a]  # repeating: prompt lookup has guesses to verify
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "adaptive": False}
    engine = start_engine(engine_config(path, 2, speculative_config=ngram))
    try:
        for i, p in enumerate(batch):
            engine.add_request(str(i), p, GREEDY)
        tokens = run_to_end(engine)
        assert engine.stats().spec_decode_num_draft_tokens > 0
    finally:
        engine.close()
    for i, p in enumerate(batch):
        assert tokens[str(i)] == hf_greedy(hf, p, GREEDY.max_tokens)
