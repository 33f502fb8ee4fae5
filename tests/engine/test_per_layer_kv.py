"""Gemma 4's KV layout: full attention layers with heads of their own size and count, the last layers reading an
earlier layer's cache (no cache of their own), KV moved between engines in the widest layer's shape; its per-layer
embedding table kept in the checkpoint's bf16; and what such a model refuses (pipeline stages)."""

from __future__ import annotations

import pytest
import torch
import transformers

from sagellm import LLM, SamplingParams
from sagellm.common.errors import InvalidInput
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.kv_cache import allocate_kv_caches, bytes_per_block, read_tokens, write_tokens
from sagellm.runtime.execution_graph.graph import GraphError
from sagellm.runtime.models.decoder_graph import build_decoder_graph
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.parallel.engine import start_engine
from tests.oracle import ENGINE_BACKEND, hf_greedy, random_prompts
from tests.tiny_models import make_tiny_gemma3n, make_tiny_gemma4, tiny_model_config

LAYER_TYPES = ("sliding_attention", "sliding_attention", "full_attention") * 2


def gemma4_shaped(**changes):
    return tiny_model_config(num_layers=6, layer_types=LAYER_TYPES, sliding_window=8, head_dim=8, full_head_dim=16,
                             num_kv_heads=2, full_num_kv_heads=1, num_kv_shared_layers=2, **changes)  # fmt: skip


def test_shared_layers_read_the_last_earlier_layer_of_their_type_and_hold_no_cache():
    config = gemma4_shaped()
    assert [config.kv_source(i) for i in range(6)] == [0, 1, 2, 3, 3, 2]
    assert config.kv_layers == [0, 1, 2, 3] and config.num_kv_layers == 4
    caches = allocate_kv_caches(config, num_blocks=3, block_size=4, device=torch.device("cpu"))
    assert [tuple(k.shape) for k, _ in caches] == [(3, 4, 2, 8), (3, 4, 2, 8), (3, 4, 1, 16), (3, 4, 2, 8)]
    assert bytes_per_block(config, 4) == 4 * 4 * 2 * (3 * 2 * 8 + 16)  # fp32, block of 4, K and V


def test_kv_travels_in_the_widest_shape_and_lands_in_each_layers_own():
    config = gemma4_shaped()
    source = allocate_kv_caches(config, num_blocks=3, block_size=4, device=torch.device("cpu"))
    for k, v in source:
        k.copy_(torch.randn(k.shape))
        v.copy_(torch.randn(v.shape))
    slots = torch.tensor([5, 6, 9])
    kv = read_tokens(source, slots)
    assert tuple(kv.shape) == (4, 2, 3, 2, 16) == (config.num_kv_layers, 2, 3, *config.kv_row_shape)
    assert kv[2, :, :, 1:].abs().sum() == 0 and kv[0, :, :, :, 8:].abs().sum() == 0  # the padding is zeros
    target = allocate_kv_caches(config, num_blocks=3, block_size=4, device=torch.device("cpu"))
    write_tokens(target, torch.tensor([0, 1, 2]), kv)
    for (k, v), (k2, v2) in zip(source, target):
        assert torch.equal(k.flatten(0, 1)[slots], k2.flatten(0, 1)[:3])
        assert torch.equal(v.flatten(0, 1)[slots], v2.flatten(0, 1)[:3])


def test_sliding_layers_with_blocks_of_their_own_move_only_the_tokens_they_hold():
    """Where the sliding-window layers keep a group of blocks of their own, each layer reads and writes its own
    group's slots; a passed position's (-1) reads as zeros and is not written."""
    config = tiny_model_config(num_layers=6, layer_types=LAYER_TYPES, sliding_window=8, head_dim=8,
                               full_head_dim=16, num_kv_heads=2, full_num_kv_heads=1)  # fmt: skip
    source = allocate_kv_caches(config, num_blocks=6, block_size=4, device=torch.device("cpu"), window_blocks=3)
    assert [k.shape[0] for k, _ in source] == [3, 3, 6, 3, 3, 6]
    for k, v in source:
        k.copy_(torch.randn(k.shape))
        v.copy_(torch.randn(v.shape))
    full, sliding = torch.tensor([17, 18, 19]), torch.tensor([-1, 5, 6])
    per_layer = [full if k.shape[0] == 6 else sliding for k, _ in source]
    kv = read_tokens(source, per_layer)
    assert kv[0, :, 0].abs().sum() == 0 and torch.equal(kv[0, 0, 1, :2, :8], source[0][0].flatten(0, 1)[5])
    target = allocate_kv_caches(config, num_blocks=6, block_size=4, device=torch.device("cpu"), window_blocks=3)
    write_tokens(target, per_layer, kv)
    for (k, _), (k2, _), slots in zip(source, target, per_layer):
        kept = slots[slots >= 0]
        assert torch.equal(k.flatten(0, 1)[kept], k2.flatten(0, 1)[kept])
    assert target[0][0].flatten(0, 1)[:4].abs().sum() == 0  # the null block: never written


def test_a_model_with_shared_kv_is_one_pipeline_stage():
    with pytest.raises(GraphError, match="one pipeline stage"):
        build_decoder_graph(gemma4_shaped(), range(0, 3))


@pytest.mark.parametrize("make", [make_tiny_gemma4, make_tiny_gemma3n])
def test_gemma4_and_3n_in_pipeline_stages_are_refused_at_start(tmp_path, make):
    """Before any rank starts, saying what to use instead (tests/parallel/test_tensor_parallel_gemma.py)."""
    model = make(tmp_path / "model")
    with pytest.raises(InvalidInput, match="Gemma 4 and Gemma 3n .* one pipeline stage; split them with tensor_par"):
        start_engine(EngineConfig(model=str(model), backend="cpu", tensor_parallel_size=1, pipeline_parallel_size=2,
                                  num_kv_blocks=64))  # fmt: skip


def test_the_first_layers_of_a_model_with_shared_kv_are_a_model_of_their_own():
    """What `sagellm inspect --layers N` prints: of the layers sharing KV, only those among the first N."""
    config = gemma4_shaped()
    assert config.first_layers(3).num_kv_shared_layers == 0
    five = config.first_layers(5)
    assert five.num_kv_shared_layers == 1 and [five.kv_source(i) for i in range(5)] == [0, 1, 2, 3, 3]
    assert build_decoder_graph(five).op_counts()["rope_query"] == 1  # the sharing layer turns its queries alone


def test_a_bf16_per_layer_table_stays_bf16_and_decodes_as_transformers(tmp_path):
    """Gemma 4's per-layer embedding table is read a row per token: kept in the checkpoint's bf16 (half the memory of
    float32), its rows widened as read; the tokens are transformers' on the same weights."""
    path = make_tiny_gemma4(tmp_path / "gemma4")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    hf.save_pretrained(path)  # the checkpoint in bf16, as Gemma 4 ships
    loaded = load_model(path, load_tokenizer=False)
    assert loaded.weights["model.embed_tokens_per_layer.weight"].dtype == torch.bfloat16
    assert loaded.weights["model.per_layer_model_projection.weight"].dtype == torch.float32
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts(hf.config.vocab_size, [7, 19])
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64).generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 16) for p in prompts]
