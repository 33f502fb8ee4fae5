"""Tensor parallel Gemma 4 and Gemma 3n against the oracle: TP=2 (rank 0 here, rank 1 a real process) splits each
layer by its own heads, in whole GQA groups of its own size and count (the full attention layers' heads twice the
size, fewer KV heads: 6 query heads over 3 sliding KV heads are 4 + 2, over 2 full ones 3 + 3), the layers sharing
an earlier layer's KV the same way as it, and each MLP by its own width; per-layer embeddings, layer scalars, AltUp
and LAuReL stay whole. On a tiny random Gemma 4 (E2B-shaped: per-layer embeddings, shared KV, double-wide MLPs), a
Gemma 4 mixture (26B-A4B-shaped: experts beside each dense MLP, split whole) and a Gemma 3n (activation sparsity
over the whole row of a split MLP), it gives transformers' logits within fp32 tolerance and its greedy tokens
exactly through chunked prefill, a continuous batch, a prefix hit and proposals; a prompt's KV leaves a split engine
whole (each layer's heads joined) and arrives whole in one, and back. Each rank's cache holds its heads of each
layer; a size the full attention layers cannot split is refused with the reason (pipeline stages:
tests/engine/test_per_layer_kv.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import SamplingParams
from sagellm.common.errors import InvalidInput
from sagellm.runtime.engine.kv_cache import allocate_kv_caches, read_tokens, write_tokens
from sagellm.runtime.models.decoder_graph import build_decoder_graph
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.tensor_parallel import TensorShard, rank_config, rank_slices, shard_tensor_parallel
from sagellm.runtime.parallel.engine import start_engine
from sagellm.runtime.parallel.kv_shares import join_kv_shares, kv_share, share_widths
from tests.oracle import (
    assert_greedy_through_a_prefix_hit_and_proposals,
    assert_last_logits_match,
    finished_outputs,
    hf_greedy,
    random_prompts,
    run_to_end,
)
from tests.parallel.split_engines import NGRAM, engine_config
from tests.tiny_models import make_tiny_gemma3n, make_tiny_gemma4, make_tiny_gemma4_moe

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
UNEVEN = {"num_attention_heads": 6, "num_key_value_heads": 3, "num_global_key_value_heads": 2}
MAKERS = {
    "gemma4": lambda path: make_tiny_gemma4(path, **UNEVEN),
    "gemma4_moe": lambda path: make_tiny_gemma4_moe(path, **UNEVEN),
    "gemma3n": lambda path: make_tiny_gemma3n(path, num_attention_heads=6, num_key_value_heads=3, hidden_size=96),
}


@pytest.fixture(scope="module", params=list(MAKERS))
def tiny(request, tmp_path_factory):
    path = MAKERS[request.param](tmp_path_factory.mktemp(request.param) / request.param)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tp2(tiny):
    engine = start_engine(engine_config(tiny[0], 2, max_num_batched_tokens=8, speculative_config=NGRAM))
    yield engine
    engine.close()


def _config(path):
    return load_model(path, load_tokenizer=False, load_weights=False).config


def test_each_layer_is_split_by_its_own_heads_and_width(tmp_path):
    """Gemma 4 E2B-shaped, layers sliding, sliding, full twice, the last two reading layers 3 and 2's KV: a sliding
    layer's 3 KV heads of 16 split 2 + 1 (query heads 4 + 2), a full layer's 2 of 32 split 1 + 1 (3 + 3); the
    double-wide MLPs of the last two split by their own width; each rank's cache holds its heads of each layer."""
    config = _config(make_tiny_gemma4(tmp_path / "m", **UNEVEN))
    s = rank_slices(config, TensorShard(1, 2))
    assert [(a.kv_heads, a.heads) for a in s.attention] == [((2, 3), (4, 6)), ((2, 3), (4, 6)), ((1, 2), (3, 6))] * 2
    assert s.intermediate == ((64, 128),) * 4 + ((128, 256),) * 2
    own = rank_config(config, TensorShard(0, 2))
    caches = allocate_kv_caches(own, num_blocks=2, block_size=4, device=torch.device("cpu"))
    assert [tuple(k.shape[2:]) for k, _ in caches] == [(2, 16), (2, 16), (1, 32), (2, 16)]
    graph = shard_tensor_parallel(build_decoder_graph(config), config, TensorShard(1, 2))
    linears = {n.params["weight"]: n.params for n in graph.nodes.values() if n.op == "linear"}
    full = "model.layers.5.self_attn.q_proj.weight"  # heads 3..5 of 32, reading layer 2's cache
    assert (linears[full]["out_features"], linears[full]["shard"]) == (96, (0, 96, 192))
    assert linears["model.layers.2.self_attn.k_proj.weight"]["shard"] == (0, 32, 64)  # its values are its keys
    assert linears["model.layers.4.mlp.down_proj.weight"]["shard"] == (1, 128, 256)
    assert "shard" not in linears["model.layers.4.per_layer_projection.weight"]  # the stream's: whole
    queries = [(n.params["layer"], n.params["num_heads"]) for n in graph.nodes.values() if n.op == "rope_query"]
    assert queries == [(4, 2), (5, 3)]


def test_a_sparse_layers_split_gate_keeps_the_whole_rows_width(tmp_path):
    config = _config(make_tiny_gemma3n(tmp_path / "m"))
    graph = shard_tensor_parallel(build_decoder_graph(config), config, TensorShard(0, 2))
    sparse = [n.params for n in graph.nodes.values() if n.op == "gaussian_top_k"]
    assert [(p["layer"], p["width"]) for p in sparse] == [(0, 128), (1, 128)]


def test_a_prompts_kv_splits_into_each_ranks_heads_of_each_layer_and_joins_again(tmp_path):
    """What the ranks read, all-gathered by their widest share, joins to what one engine reads; what arrives whole
    lands in each rank's cache as its heads of each layer."""
    config = _config(make_tiny_gemma4(tmp_path / "m", **UNEVEN))
    whole = allocate_kv_caches(config, num_blocks=3, block_size=4, device=torch.device("cpu"))
    for k, v in whole:
        k.copy_(torch.randn(k.shape))
        v.copy_(torch.randn(v.shape))
    slots, layers = torch.tensor([1, 5, 6, 9]), config.kv_layers
    kv = read_tokens(whole, slots)  # [4 layers, 2, 4 tokens, 3 heads, 32]
    shares = []
    for rank in (0, 1):
        shard = TensorShard(rank, 2)
        own = allocate_kv_caches(rank_config(config, shard), num_blocks=3, block_size=4, device=torch.device("cpu"))
        write_tokens(own, slots, kv_share(kv, config, shard, layers))
        attention = rank_slices(config, shard).attention
        for (k, _), (whole_k, _), layer in zip(own, whole, layers):
            first, end = attention[layer].kv_heads
            assert torch.equal(k.flatten(0, 1)[slots], whole_k.flatten(0, 1)[slots][:, first:end])
        shares.append(read_tokens(own, slots))
    widths = share_widths(config, 2, layers)
    assert widths == [share.shape[3] for share in shares] == [2, 1]
    assert torch.equal(join_kv_shares(torch.cat(shares, dim=3), config, 2, layers), kv)


def test_a_size_the_full_attention_layers_cannot_split_is_refused_before_any_rank_starts(tmp_path):
    path = make_tiny_gemma4(tmp_path / "m")  # E2B's one KV head in each full attention layer
    with pytest.raises(InvalidInput, match="more than the model's 1 KV heads of its full attention layers"):
        start_engine(engine_config(path, 2))


def test_tp2_prefill_logits_match_transformers(tiny, tp2):
    _, hf = tiny
    assert_last_logits_match(tp2, hf, random_prompts(hf.config.vocab_size, [1, 7, 16, 23]))


def test_tp2_greedy_tokens_equal_transformers_through_chunks_a_batch_and_a_prefix_hit(tiny, tp2):
    """Prompts of up to 21 tokens (past the window of 8) prefill in chunks of 8 beside decodes; the third starts
    with the first, whose blocks are cached; n-gram proposals are verified on both ranks."""
    assert_greedy_through_a_prefix_hit_and_proposals(tp2, tiny[1], GREEDY)


def test_a_prompts_kv_moves_between_tp2_and_tp1_engines_and_decodes_as_transformers(tiny, tp2):
    """The KV leaves a split engine whole, every layer's heads joined in the widest layer's shape, and arrives whole
    in each rank's heads of each layer."""
    path, hf = tiny
    whole = start_engine(engine_config(path, 1))
    try:
        config = whole.model.config
        prompts = random_prompts(hf.config.vocab_size, [9, 17], seed=5)
        for prefill, decode in ((tp2, whole), (whole, tp2)):
            for i, p in enumerate(prompts):
                prefill.add_request(f"pd-{i}", p, GREEDY, prefill_only=True)
            firsts = {}
            for o in finished_outputs(prefill):
                assert tuple(o.kv.shape) == (config.num_kv_layers, 2, len(o.prompt_token_ids), *config.kv_row_shape)
                firsts[o.request_id] = first = o.outputs[0].token_ids[0]
                decode.add_prefilled_request(o.request_id, o.prompt_token_ids, GREEDY, first, o.kv)
            tokens = run_to_end(decode)
            for i, p in enumerate(prompts):
                assert [firsts[f"pd-{i}"], *tokens[f"pd-{i}"]] == hf_greedy(hf, p, GREEDY.max_tokens)
    finally:
        whole.close()
