"""A mixture of experts against the oracle: a tiny random Mixtral (4 experts, 2 per token) gives transformers' logits
within fp32 tolerance and its greedy tokens exactly, through a continuous batch of prefills and decodes (whole and
chunked), from its Hugging Face directory and from GGUF files (F32, and Q8_0 against transformers holding the
dequantized weights); the `moe` kernel's shares of the experts add up to the whole layer; bad expert counts are
refused at load time."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.backends import torch_ops
from sagellm.backends.layer_specs import MoeSpec
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from tests.oracle import ENGINE_BACKEND, assert_last_logits_match, hf_greedy, random_prompts
from tests.tiny_models import make_tiny_mixtral, write_tiny_gguf

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_mixtral(tmp_path_factory.mktemp("mixtral") / "mixtral")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def test_the_graph_has_one_moe_op_per_layer_and_no_dense_mlp(tiny):
    path, hf = tiny
    engine = LLMEngine(EngineConfig(model=str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64))
    counts = engine.runner.graph.op_counts()
    assert counts["moe"] == hf.config.num_hidden_layers and counts["silu_mul"] == 0
    assert engine.model.config.num_params() == sum(p.numel() for p in hf.parameters())


def test_prefill_logits_match_transformers_for_a_mixed_batch(tiny):
    path, hf = tiny
    engine = LLMEngine(EngineConfig(model=str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64))
    batch_prompts = random_prompts(hf.config.vocab_size, [1, 7, 16, 23])
    assert_last_logits_match(engine, hf, batch_prompts)


@pytest.mark.parametrize("batched_tokens", [512, 8], ids=["whole", "chunked"])
def test_greedy_tokens_identical_to_transformers_in_a_continuous_batch(tiny, batched_tokens):
    """Chunked: every prompt over several steps, its chunks in the same batches as other sequences' decodes."""
    path, hf = tiny
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64, max_num_batched_tokens=batched_tokens)
    batch_prompts = random_prompts(hf.config.vocab_size, [5, 30, 17, 9])
    for p, out in zip(batch_prompts, llm.generate(batch_prompts, GREEDY)):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, GREEDY.max_tokens)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_a_gguf_mixtral_decodes_as_transformers_on_its_weights(tiny, tmp_path, qtype):
    """llama.cpp's layout: a "llama" GGUF with expert counts, each layer's experts stacked [E, out, in]."""
    path, hf = tiny
    gguf_path = write_tiny_gguf(tmp_path / f"mixtral.{qtype}.gguf", path, qtype)
    loaded = load_model(gguf_path)
    assert (loaded.config.architecture, loaded.config.num_experts, loaded.config.experts_per_token) == ("mixtral", 4, 2)
    reference = hf
    if qtype != "F32":  # transformers holding exactly the dequantized weights we load
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        reference.load_state_dict(_fused_experts(loaded.weights, hf.config.num_hidden_layers, 4))
    llm = LLM(str(gguf_path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=64)
    batch_prompts = random_prompts(hf.config.vocab_size, [19, 6])
    for p, out in zip(batch_prompts, llm.generate(batch_prompts, GREEDY)):
        assert out.outputs[0].token_ids == hf_greedy(reference, p, GREEDY.max_tokens)


def _fused_experts(weights: dict[str, torch.Tensor], layers: int, experts: int) -> dict[str, torch.Tensor]:
    """Our per-expert names as transformers>=5 holds a Mixtral: mlp.gate, and mlp.experts' gate_up_proj/down_proj."""
    state = {k: v for k, v in weights.items() if "block_sparse_moe" not in k}
    for i in range(layers):
        p = f"model.layers.{i}."
        expert = [f"{p}block_sparse_moe.experts.{e}." for e in range(experts)]
        state[f"{p}mlp.gate.weight"] = weights[f"{p}block_sparse_moe.gate.weight"]
        state[f"{p}mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([weights[x + "w1.weight"], weights[x + "w3.weight"]]) for x in expert]
        )
        state[f"{p}mlp.experts.down_proj"] = torch.stack([weights[x + "w2.weight"] for x in expert])
    return state


def test_the_kernels_shares_of_the_experts_add_up_to_the_whole_layer():
    """What expert parallel relies on: each rank's experts' part, summed, is the layer; and the layer is Mixtral's."""
    g = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts, top_k = 9, 16, 24, 5, 2
    x = torch.randn(tokens, hidden, generator=g)
    router = torch.randn(experts, hidden, generator=g)
    gate_up = 0.3 * torch.randn(experts, 2 * inter, hidden, generator=g)
    down = 0.3 * torch.randn(experts, hidden, inter, generator=g)
    whole = torch_ops.moe(x, MoeSpec(router, gate_up, down, top_k, 0))
    shares = [(0, 2), (2, 3), (3, 5)]
    parts = sum(torch_ops.moe(x, MoeSpec(router, gate_up[a:b], down[a:b], top_k, a)) for a, b in shares)
    torch.testing.assert_close(parts, whole)
    expected = torch.zeros_like(x)  # one token at a time, as Mixtral's paper writes it
    for t in range(tokens):
        weights, chosen = torch.softmax(router @ x[t], -1).topk(top_k)
        for w, e in zip(weights / weights.sum(), chosen):
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            expected[t] += w * (down[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(whole, expected)


@pytest.mark.parametrize(
    "change, message",
    [({"num_experts_per_tok": 5}, "a token must use 1 to 4 experts")],
)
def test_bad_expert_configs_are_refused_at_load_time(tiny, tmp_path, change, message):
    path, _ = tiny
    config = json.loads((path / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        load_model(tmp_path, load_tokenizer=False, load_weights=False)
