"""The engine on the CUDA backend against Hugging Face transformers on the same GPU: prefill logits, greedy tokens
through batching, chunked prefill and preemption, and a prefix-cache hit, on tiny random Llama and Qwen2 models and a
SmolLM2-135M-shaped one (random weights: its real ones are not at hand on an offline GPU machine).

Not collected by default (no test_ prefix): scripts/gpu_check.sh runs it on a GPU machine. Without one it runs the
same checks on the CPU through the CUDA backend's own kernel table, its triton kernels interpreted
(`SAGELLM_CHECK_BACKEND=cuda-interpreted TRITON_INTERPRET=1`, the script's dry run), or on the cpu backend
(`SAGELLM_CHECK_BACKEND=cpu`). `SAGELLM_CHECK_SIZE=small` shrinks the SmolLM2-shaped model to 2 layers (the
interpreter's pace). Everything in float32: the engine's bfloat16 is checked for closeness, not equality."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from tests.oracle import STEP_SHAPES, assert_last_logits_match, hf_greedy, random_prompts, register_interpreted_cuda
from tests.tiny_models import make_tiny_llama, make_tiny_qwen2

BACKEND = os.environ.get("SAGELLM_CHECK_BACKEND", "cuda")
SMALL = os.environ.get("SAGELLM_CHECK_SIZE") == "small"
DEVICE = torch.device("cuda" if BACKEND == "cuda" else "cpu")  # where transformers runs: beside our engine
NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
ONE_PROCESS = dict(tensor_parallel_size=1, pipeline_parallel_size=1)  # no planner: one GPU, one engine
# SmolLM2-135M's shape (HF config.json), its depth cut to 2 layers when SMALL
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=2 if SMALL else 30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0,
               tie_word_embeddings=True)  # fmt: skip
TIE_MARGIN = 1e-4  # of the logits' spread: two tokens this close are a tie that fp32 rounding may break either way


if BACKEND == "cuda-interpreted":
    register_interpreted_cuda()


MAKERS = {
    "llama": lambda path: make_tiny_llama(path),
    "qwen2": lambda path: make_tiny_qwen2(path),  # q/k/v biases, tied embeddings
    "smollm2-shaped": lambda path: make_tiny_llama(path, **SMOLLM2),
}


@pytest.fixture(scope="module", params=list(MAKERS))
def tiny(request, tmp_path_factory):
    path = MAKERS[request.param](tmp_path_factory.mktemp(request.param) / request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE).eval()
    return path, hf


def engine_llm(path, **args) -> LLM:
    return LLM(str(path), backend=BACKEND, block_size=4, **(ONE_PROCESS | {"num_kv_blocks": 64} | args))


def assert_greedy_matches(hf, prompt: list[int], ours: list[int]) -> None:
    """Our greedy tokens equal transformers', or part from them only at a tie: where they first differ, our token's
    logit in transformers' own forward is within TIE_MARGIN of its top one (a random model's logits are close)."""
    theirs = hf_greedy(hf, prompt, len(ours))
    if ours == theirs:
        return
    at = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + theirs[:at]], device=DEVICE)).logits[0, -1]
    gap = (logits[theirs[at]] - logits[ours[at]]).item() / logits.std().item()
    assert gap <= TIE_MARGIN, f"token {at}: ours {ours[at]}, transformers {theirs[at]} ({gap:.2e} of the spread apart)"


def test_prefill_logits_match_transformers_for_a_batch(tiny):
    path, hf = tiny
    engine = LLMEngine(EngineConfig(model=str(path), backend=BACKEND, block_size=4, num_kv_blocks=64, **ONE_PROCESS))
    assert_last_logits_match(engine, hf, random_prompts(hf.config.vocab_size, [1, 7, 16, 23]))


@pytest.mark.parametrize("engine_args", list(STEP_SHAPES.values()), ids=list(STEP_SHAPES))
def test_greedy_tokens_match_transformers_in_a_batch(tiny, engine_args):
    """Four prompts at once: whole prompts in a step, chunked prefill mixed with decodes, forced preemption."""
    path, hf = tiny
    llm = engine_llm(path, **engine_args)
    prompts = random_prompts(hf.config.vocab_size, [5, 30, 17, 9])
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert_greedy_matches(hf, prompt, list(out.outputs[0].token_ids))
    if "num_kv_blocks" in engine_args:
        assert sum(o.metrics.num_preemptions for o in outs) > 0


def test_prefix_cache_hit_keeps_greedy_tokens(tiny):
    path, hf = tiny
    llm = engine_llm(path)
    shared = random_prompts(hf.config.vocab_size, [21], seed=1)[0]
    suffixes = random_prompts(hf.config.vocab_size, [3, 6, 1], seed=2)
    assert llm.generate([shared + suffixes[0]], GREEDY)[0].metrics.num_cached_tokens == 0
    rest = llm.generate([shared + s for s in suffixes[1:]], GREEDY)
    for s, out in zip(suffixes[1:], rest):
        assert out.metrics.num_cached_tokens == 20  # 5 full blocks of the shared 21 tokens
        assert_greedy_matches(hf, shared + s, list(out.outputs[0].token_ids))


def test_bfloat16_linears_stay_close_to_transformers_float32(tiny):
    """dtype=bfloat16 (the linears' weights in bf16): the last-position logits of a batch prefilled in one step within
    a fraction of the spread of transformers' fp32 logits, and the same top token for most prompts."""
    path, hf = tiny
    llm = engine_llm(path, dtype="bfloat16")
    prompts = random_prompts(hf.config.vocab_size, [3, 8, 16, 23, 30, 11], seed=4)
    steps, execute = [], llm.engine.runner.execute
    llm.engine.runner.execute = lambda batch: steps.append(execute(batch)) or steps[-1]
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0))
    errors, same_top = [], 0
    for row, prompt in zip(steps[0], prompts):  # the first step: every prompt whole, in arrival order
        with torch.no_grad():
            ref = hf(torch.tensor([prompt], device=DEVICE)).logits[0, -1].to(row.device)
        errors.append(((row.float() - ref).abs().max() / ref.std()).item())
        same_top += int(row.argmax() == ref.argmax())
    print(f"bf16 linears: logits error max {max(errors):.3f} of the spread, top token same {same_top}/{len(prompts)}")
    assert len(steps[0]) == len(prompts) and max(errors) < 0.25 and same_top >= len(prompts) // 2
