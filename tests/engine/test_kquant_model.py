"""A Q4_K_M GGUF, the file people download, served from its blocks: a tiny Llama written with llama.cpp's mix of
types (Q4_K, with Q6_K for the output, a tied embedding and some layers' attn_v and ffn_down; Q5_0 and Q8_0 where
rows are not whole super-blocks) gives transformers' logits and greedy tokens on the dequantized weights, while
every linear of the engine's plan holds only its blocks (no float copy) and the embedding reads its rows from them; with
--int8-activations (and on a Q5_K file), the same against transformers with each such linear's input rounded as
llama.cpp rounds it."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.backends.cpu_linear import CpuLinearWeight
from sagellm.backends.quantized import QuantizedWeight
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.execution_graph.fuse_layers import FusedLayers
from sagellm.runtime.models.loader import load_model
from tests.oracle import (
    ENGINE_BACKEND,
    assert_last_logits_match,
    hf_greedy,
    random_prompts,
    round_int8_linears_inputs,
)
from tests.tiny_models import make_tiny_llama, write_tiny_gguf

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
ENGINE = dict(backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=128)
# Whole super-blocks of 256 inputs in every linear (else llama.cpp falls back to Q5_0/Q8_0), 4 layers: attn_v and
# ffn_down are Q6_K in layers 2 and 3 (use_more_bits: i >= 7n/8, or (i - n/8) % 3 == 2), Q4_K in 0 and 1.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def q4_k_m(request, tmp_path_factory):
    """(GGUF path, transformers' model holding the file's dequantized weights)."""
    root = tmp_path_factory.mktemp("q4km")
    hf_dir = make_tiny_llama(root / "llama", **SHAPE, tie_word_embeddings=request.param)
    path = write_tiny_gguf(root / "llama.Q4_K_M.gguf", hf_dir, "Q4_K_M")
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    loaded = load_model(path)
    reference.load_state_dict(dict(loaded.weights), strict=False)  # the dequantized floats, made on read
    if request.param:
        reference.tie_weights()
    return path, reference


def test_the_file_holds_llama_cpps_mix_of_types(q4_k_m):
    path, reference = q4_k_m
    kinds = {name: w.kind for name, w in load_model(path, load_tokenizer=False).quantized.items()}
    assert kinds["model.layers.2.self_attn.v_proj.weight"] == kinds["model.layers.3.mlp.down_proj.weight"] == "Q6_K"
    assert kinds["model.layers.1.self_attn.v_proj.weight"] == kinds["model.layers.1.self_attn.q_proj.weight"] == "Q4_K"
    head = "model.embed_tokens.weight" if reference.config.tie_word_embeddings else "lm_head.weight"
    assert kinds[head] == "Q6_K" and set(Counter(kinds.values())) == {"Q4_K", "Q6_K"}


def test_every_linear_holds_only_its_blocks_and_the_embedding_reads_them(q4_k_m):
    path, _ = q4_k_m
    engine = LLMEngine(EngineConfig(model=str(path), **ENGINE))
    constants = list(_constants(engine.runner.plan))
    linears = [c for c in constants if isinstance(c, CpuLinearWeight)]
    assert len(linears) == 4 * 4 + 1  # qkv, o, gate_up, down a layer, and the lm_head
    assert all(w.packed is None and w.dense is None and w.rows is None for w in linears), "no float copy"
    assert all(w.blocks is not None or w.parts for w in linears)
    assert any(w.parts for w in linears), "layers whose v is Q6_K beside Q4_K q and k read each part's blocks"
    assert sum(isinstance(c, QuantizedWeight) for c in constants) == 1  # the embedding's rows, from its blocks
    floats = [c for c in constants if isinstance(c, torch.Tensor) and c.is_floating_point() and c.dim() == 2]
    assert {tuple(c.shape) for c in floats} == {(engine.max_model_len, 64)}, "no float weight, only the rope table"


def test_logits_and_greedy_tokens_match_transformers_on_the_dequantized_weights(q4_k_m):
    path, reference = q4_k_m
    prompts = random_prompts(reference.config.vocab_size, [5, 30, 17, 9, 60, 180])
    engine = LLMEngine(EngineConfig(model=str(path), **ENGINE))
    # 301 rows in one step: the tiles for torch's GEMM (Intel), block_int16.c's int16 path where built (x rounded to
    # 2^-16 of each block's largest, ~1e-4 of the logits after 4 layers: 9.6e-5 measured), else the fp32 kernels
    assert_last_logits_match(engine, reference, prompts, tolerance=3e-4)
    for batched_tokens in (512, 8):
        llm = LLM(str(path), max_num_batched_tokens=batched_tokens, **ENGINE)
        outs = llm.generate(prompts, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(reference, p, 16) for p in prompts]


def _constants(plan):
    """Every constant a plan's instructions bind, those of fused layers' own instructions included."""
    for instr in plan.instrs:
        yield from instr.consts
        if isinstance(instr.kernel, FusedLayers):
            yield from _constants(instr.kernel.fallback)


@pytest.fixture(scope="module")
def q5_k(tmp_path_factory):
    """A GGUF of Q5_K linears (Q4_K_M's shapes) and transformers holding its dequantized weights."""
    root = tmp_path_factory.mktemp("q5k")
    hf_dir = make_tiny_llama(root / "llama", **SHAPE, tie_word_embeddings=False)
    path = write_tiny_gguf(root / "llama.Q5_K.gguf", hf_dir, "Q5_K")
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    reference.load_state_dict(dict(load_model(path).weights), strict=False)
    return path, reference


INT8_ONLY_ON_CPU = pytest.mark.skipif(ENGINE_BACKEND != "cpu", reason="int8 activations: the cpu backend's kernels")


@INT8_ONLY_ON_CPU
def test_int8_activations_match_the_reference_with_each_linears_input_rounded(q4_k_m):
    """Q4_K's and Q6_K's linears on x rounded per 32 inputs to int8 (block_q8.c) against transformers whose linears
    take their input so rounded: greedy tokens through prompt chunks and decode, and every step's logprobs."""
    assert_int8_activations_match(*q4_k_m)


@INT8_ONLY_ON_CPU
def test_int8_activations_on_q5_k_match_the_reference_likewise(q5_k):
    path, reference = q5_k
    assert "Q5_K" in {w.kind for w in load_model(path, load_tokenizer=False).quantized.values()}
    assert_int8_activations_match(path, reference)


def assert_int8_activations_match(path, reference) -> None:
    """Each step's token the rounded reference's greedy choice and its logprob the reference's to fp32, but where a
    rounding flipped: fp32's order of sums differs between engines by ~1e-7, and an x that close to a rounding
    boundary (q + 0.5) rounds to the neighbouring int8, moving the outputs by ~1e-3 (a few of 48 steps here, more
    with longer prompts; on a tiny random model's near-ties it can pick the other token). So: most steps exact to
    1e-5, none off by more than a flip's size, while the unrounded reference is off at most."""
    rounded = copy.deepcopy(reference)  # the hooks stay off the module's shared model
    round_int8_linears_inputs(rounded, load_model(path, load_tokenizer=False).quantized)
    prompts = random_prompts(reference.config.vocab_size, [3, 4, 5, 6, 7, 9])
    llm = LLM(str(path), int8_activations=True, max_num_batched_tokens=4, **ENGINE)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    errors: dict[str, list[float]] = {"rounded": [], "unrounded": []}
    for prompt, out in zip(prompts, llm.generate(prompts, greedy)):
        tokens, chosen = out.outputs[0].token_ids, out.outputs[0].logprobs
        for name, model in (("rounded", rounded), ("unrounded", reference)):
            with torch.no_grad():  # teacher-forced on our tokens
                expected = torch.log_softmax(
                    model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :], -1
                )
            errors[name] += [abs(c.logprob - expected[i, c.token_id].item()) for i, c in enumerate(chosen)]
            if name == "rounded":  # its greedy choice, or a near-tie's other token
                assert all(expected[i].max() - expected[i, token] <= 1e-2 for i, token in enumerate(tokens))
    rounded_errors, unrounded_errors = torch.tensor(errors["rounded"]), torch.tensor(errors["unrounded"])
    assert rounded_errors.median() <= 1e-5 and rounded_errors.max() <= 1e-2, rounded_errors
    assert unrounded_errors.median() > 1e-4, "the unrounded reference is farther: x was rounded"
