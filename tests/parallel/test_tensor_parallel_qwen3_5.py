"""Tensor parallel Qwen3.5 against the oracle: TP=2 (rank 0 here, rank 1 a real process) splits the Gated DeltaNet
layers by key head, each rank with the value heads reading its key heads and only their recurrent states, and the
gated attention by whole heads of query and gate. On a tiny random Qwen3.5 with heads split unevenly (3 key heads
and 3 KV heads over 2 ranks), a Qwen3.5-MoE (experts split too, the shared expert whole), a Qwen3-Next (its
projections fused per key head, parted at load) and a Qwen3.5 GGUF (value heads tiled by key head: each rank's are
two runs), it gives transformers' logits within fp32 tolerance and its greedy tokens exactly through chunked
prefill, a continuous batch, a prefix hit restoring each rank's checkpoint and proposals rolled back; a prompt's
states leave a split engine whole and arrive whole in one, with pipeline stages too (TP=2 x PP=2); a Q8_0 file's
projections are cut from their blocks; more ranks than key heads is refused with the reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import SamplingParams
from sagellm.common.errors import InvalidInput
from sagellm.runtime.engine.state_cache import values_per_state_slot
from sagellm.runtime.models.decoder_graph import build_decoder_graph
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.tensor_parallel import TensorShard, rank_config, rank_slices, shard_tensor_parallel
from sagellm.runtime.parallel.engine import start_engine
from sagellm.runtime.parallel.state_shares import join_state_shares, state_share
from tests.oracle import (
    assert_greedy_through_a_prefix_hit_and_proposals,
    assert_last_logits_match,
    finished_outputs,
    hf_greedy,
    random_prompts,
    run_to_end,
)
from tests.parallel.split_engines import NGRAM, engine_config
from tests.tiny_models import make_tiny_qwen3_5, make_tiny_qwen3_5_moe, make_tiny_qwen3_next, write_tiny_gguf

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
UNEVEN = {"num_attention_heads": 6, "num_key_value_heads": 3, "linear_num_key_heads": 3, "linear_num_value_heads": 6}


def _gguf(directory):
    hf_dir = make_tiny_qwen3_5(directory / "hf")
    return write_tiny_gguf(directory / "model.gguf", hf_dir, "F32"), hf_dir


MAKERS = {
    "qwen3_5": lambda directory: (make_tiny_qwen3_5(directory / "hf", **UNEVEN),) * 2,
    "qwen3_5_moe": lambda directory: (make_tiny_qwen3_5_moe(directory / "hf"),) * 2,
    "qwen3_next": lambda directory: (make_tiny_qwen3_next(directory / "hf"),) * 2,
    "qwen3_5_gguf": _gguf,
}


@pytest.fixture(scope="module", params=list(MAKERS))
def tiny(request, tmp_path_factory):
    """(the model the engine loads, transformers' model of the same weights)."""
    path, hf_dir = MAKERS[request.param](tmp_path_factory.mktemp(request.param))
    return path, AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tp2(tiny):
    engine = start_engine(engine_config(tiny[0], 2, max_num_batched_tokens=8, speculative_config=NGRAM))
    yield engine
    engine.close()


def test_each_rank_holds_whole_key_heads_with_the_value_heads_reading_them(tmp_path):
    """3 key heads of 6 value heads grouped (Hugging Face's order) split 2 + 1, each rank's value heads one run;
    2 key heads of 4 tiled (a GGUF's) split 1 + 1, each rank's value heads every second one. The convolution's
    channels are the key heads' q and k and the value heads' v (heads of 16)."""
    config = load_model(make_tiny_qwen3_5(tmp_path / "m", **UNEVEN), load_tokenizer=False, load_weights=False).config
    grouped = [rank_slices(config, TensorShard(rank, 2)) for rank in (0, 1)]
    assert [(s.linear_key_heads, s.linear_value_heads) for s in grouped] == [((0, 2), ((0, 4),)), ((2, 3), ((4, 6),))]
    assert [s.linear_channels for s in grouped] == [((0, 32), (48, 80), (96, 160)), ((32, 48), (80, 96), (160, 192))]
    tiled = dataclasses.replace(config, linear_num_key_heads=2, linear_num_value_heads=4, linear_value_heads_tiled=True)
    s = rank_slices(tiled, TensorShard(1, 2))
    assert (s.linear_key_heads, s.linear_value_heads) == ((1, 2), ((1, 2), (3, 4)))
    assert s.linear_channels == ((16, 32), (48, 64), (80, 96), (112, 128))
    own = rank_config(config, TensorShard(1, 2))
    assert (own.linear_num_key_heads, own.linear_num_value_heads, own.linear_conv_dim) == (1, 2, 64)


def test_a_delta_net_layer_is_cut_by_heads_and_its_output_all_reduced(tmp_path):
    config = load_model(make_tiny_qwen3_5(tmp_path / "m", **UNEVEN), load_tokenizer=False, load_weights=False).config
    graph = shard_tensor_parallel(build_decoder_graph(config), config, TensorShard(1, 2))
    (delta, *_) = [node for node in graph.nodes.values() if node.op == "gated_delta_net"]
    assert (delta.params["num_k_heads"], delta.params["value_heads"]) == (1, ((4, 6),))
    linears = {n.params["weight"].rpartition("linear_attn.")[2]: n for n in graph.nodes.values() if n.op == "linear"}
    shards = {role: (n.params["out_features"], n.params["shard"]) for role, n in linears.items() if "in_proj" in role}
    assert shards == {
        "in_proj_qkv.weight": (64, (0, 32, 48, 80, 96, 160, 192)),
        "in_proj_z.weight": (32, (0, 64, 96)),
        "in_proj_b.weight": (2, (0, 4, 6)),
        "in_proj_a.weight": (2, (0, 4, 6)),
    }
    out_proj = linears["out_proj.weight"]
    assert out_proj.params["shard"] == (1, 64, 96)
    assert {graph.nodes[e.dst].op for e in graph.edges if e.src == out_proj.id} == {"all_reduce"}
    (q_proj, *_) = [n for n in graph.nodes.values() if n.op == "linear" and "q_proj" in n.params["weight"]]
    assert q_proj.params["shard"] == (0, 128, 192)  # heads 4 and 5, each a query of 16 and its gate of 16


def test_a_slots_states_split_into_each_ranks_share_and_join_again(tiny):
    config = load_model(tiny[0], load_tokenizer=False, load_weights=False).config
    whole = torch.randn(values_per_state_slot(config))
    shares = [state_share(whole, config, TensorShard(rank, 2)) for rank in (0, 1)]
    assert [s.numel() for s in shares] == [
        values_per_state_slot(rank_config(config, TensorShard(r, 2))) for r in (0, 1)
    ]
    assert torch.equal(join_state_shares(shares, config), whole)


def test_tp2_prefill_logits_match_transformers(tiny, tp2):
    _, hf = tiny
    assert_last_logits_match(tp2, hf, random_prompts(hf.config.vocab_size, [1, 7, 16, 23]))


def test_tp2_greedy_tokens_equal_transformers_through_chunks_a_batch_and_a_prefix_hit(tiny, tp2):
    """Prompts of up to 27 tokens prefill in chunks of 8 beside decodes; the third starts with the first, whose
    states each rank checkpointed; n-gram proposals (mostly rejected) roll each rank's states back."""
    assert_greedy_through_a_prefix_hit_and_proposals(tp2, tiny[1], GREEDY)


def test_a_prompts_states_move_between_tp2_and_tp1_engines_and_decode_as_transformers(tiny, tp2):
    """A prefill/decode hand-over with the states split on one side: they leave whole (the ranks' shares joined) and
    arrive whole (each rank keeps its share)."""
    _, hf = tiny
    whole = start_engine(engine_config(tiny[0], 1))
    try:
        prompts = random_prompts(hf.config.vocab_size, [9, 17], seed=5)
        for prefill, decode in ((tp2, whole), (whole, tp2)):
            for i, p in enumerate(prompts):
                prefill.add_request(f"pd-{i}", p, GREEDY, prefill_only=True)
            firsts = {}
            for o in finished_outputs(prefill):
                assert o.states is not None and o.states.numel() == whole.runner.states_size == tp2.runner.states_size
                firsts[o.request_id] = first = o.outputs[0].token_ids[0]
                decode.add_prefilled_request(o.request_id, o.prompt_token_ids, GREEDY, first, o.kv, states=o.states)
                assert decode._requests[o.request_id].seq.num_computed_tokens == len(o.prompt_token_ids)  # imported
            tokens = run_to_end(decode)
            for i, p in enumerate(prompts):
                assert [firsts[f"pd-{i}"], *tokens[f"pd-{i}"]] == hf_greedy(hf, p, GREEDY.max_tokens)
    finally:
        whole.close()


def test_more_ranks_than_linear_attention_key_heads_is_refused_before_any_rank_starts(tmp_path):
    path = make_tiny_qwen3_5(tmp_path / "one", linear_num_key_heads=1, linear_num_value_heads=2)
    with pytest.raises(InvalidInput, match=r"tensor parallel size 2 is more than the model's 1 linear attention"):
        start_engine(engine_config(path, 2))


def test_tp2_pp2_joins_each_stages_shares_and_hands_the_states_to_a_whole_engine_and_back(tmp_path):
    """Four ranks: two stages of a linear attention and an attention layer, each split by heads. A prefix hit and
    chunked prefill give transformers' tokens; a prompt's states leave whole (each stage's shares joined, the stages
    in order) and arrive whole (each rank takes its stage's layers, its heads of them)."""
    path = make_tiny_qwen3_5(tmp_path / "hf", **UNEVEN)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    split = start_engine(engine_config(path, 2, pipeline_parallel_size=2, max_num_batched_tokens=8))
    whole = start_engine(engine_config(path, 1))
    try:
        a, b = random_prompts(hf.config.vocab_size, [6, 9], seed=4)
        split.add_request("first", a * 2, GREEDY)
        tokens = run_to_end(split)
        split.add_request("hit", a * 2 + b, GREEDY)
        tokens |= run_to_end(split)
        assert split.stats().prefix_cache_hits > 0
        assert [tokens["first"], tokens["hit"]] == [hf_greedy(hf, p, GREEDY.max_tokens) for p in (a * 2, a * 2 + b)]
        for prefill, decode in ((split, whole), (whole, split)):
            prefill.add_request("pd", b, GREEDY, prefill_only=True)
            (handed,) = finished_outputs(prefill)
            assert handed.states.numel() == whole.runner.states_size == split.runner.states_size
            first = handed.outputs[0].token_ids[0]
            decode.add_prefilled_request("pd", handed.prompt_token_ids, GREEDY, first, handed.kv, states=handed.states)
            assert [first, *run_to_end(decode)["pd"]] == hf_greedy(hf, b, GREEDY.max_tokens)
    finally:
        split.close()
        whole.close()


def test_a_q8_0_files_delta_net_projections_keep_their_blocks_per_rank_and_decode_as_one_rank(tmp_path):
    """A rank's rows of a quantized in-projection (its q and k, and 4 runs of value heads: 8 tiled over 2 key heads)
    and its inputs of out_proj (value heads of 32, a Q8_0 block each) are cut from the blocks, so the native block
    kernels read them; greedy tokens equal one rank's."""
    hf_dir = make_tiny_qwen3_5(tmp_path / "hf", linear_num_value_heads=8, linear_value_head_dim=32)
    path = write_tiny_gguf(tmp_path / "model.gguf", hf_dir, "Q8_0")
    prompts = random_prompts(300, [5, 12, 30], seed=6)
    tokens = {}
    for tp in (1, 2):
        engine = start_engine(engine_config(path, tp))
        try:
            if tp == 2:
                graph, instrs = engine.runner.graph, engine.runner.plan.instrs
                linears = [(i, graph.nodes[i.node]) for i in instrs if i.node.startswith("linear")]
                weights = [(i, str(node.params["weight"])) for i, node in linears]
                cut = [i for i, w in weights if "in_proj_qkv" in w or "out_proj" in w]
                assert len(cut) == 4 and all(i.consts[0].blocks is not None for i in cut)  # 2 layers' in and out
            for i, p in enumerate(prompts):
                engine.add_request(str(i), p, GREEDY)
            tokens[tp] = run_to_end(engine)
        finally:
            engine.close()
    assert tokens[2] == tokens[1]
