"""Images in a tensor or pipeline parallel engine: rank 0 holds the encoders and the encoder cache, and each step
with pictures hands their embeddings to the first stage's ranks after the step's order (`parallel/take_part.py`).
The tiny LLaVA, the tiny Gemma 3 (its pictures attending both ways) and the tiny Qwen3.5 (each rank turning its
pictures' tokens by their multimodal rotary positions) in two slices and in two stages give transformers' greedy
tokens with one and two images beside a text-only prompt, LLaVA and Qwen3.5 whole and through a chunked prefill that
splits an image's placeholders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Gemma3ForConditionalGeneration

from sagellm import LLM
from tests.multimodal import test_gemma3_vision as gemma3_case
from tests.multimodal import test_llava_generate as llava_case
from tests.multimodal import test_qwen3_5_generate as qwen_case
from tests.multimodal.qwen_vl_cases import greedy_references, prompt, tokens
from tests.multimodal.test_llava_generate import hf as hf  # the fixtures: the tiny LLaVA, transformers on it
from tests.multimodal.test_llava_generate import llava as llava
from tests.multimodal.test_llava_generate import reference as reference  # and its greedy tokens
from tests.tiny_vision_models import make_tiny_gemma3_vision

pytestmark = pytest.mark.slow  # each engine starts a second rank's process

LLAVA_CASES = [(llava_case.ONE, [llava_case.NOISE]), (llava_case.TWO, [llava_case.OTHER, llava_case.RED]),
               ("a prompt without a picture", [])]  # fmt: skip


@pytest.mark.parametrize("budget", [512, 5], ids=["whole", "chunked"])
@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_llava_in_two_slices_or_two_stages_gives_transformers_tokens(llava, reference, parallel, budget):
    llm = LLM(str(llava), max_num_seqs=4, num_kv_blocks=64, max_num_batched_tokens=budget, **parallel)
    try:
        outputs = llm.generate([llava_case.prompt(text, *images) for text, images in LLAVA_CASES], llava_case.GREEDY)
    finally:
        llm.engine.close()  # its rank workers: they would live as long as the test process
    assert llava_case.tokens(outputs) == [reference(text, images) for text, images in LLAVA_CASES]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> Path:
    return make_tiny_gemma3_vision(tmp_path_factory.mktemp("gemma3") / "gemma3")


def gemma3_greedy(checkpoint: Path, text: str, images: list) -> list[int]:
    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    inputs = AutoProcessor.from_pretrained(checkpoint)(text=text, images=images or None, return_tensors="pt")
    with torch.inference_mode():
        out = model.eval().generate(**inputs, max_new_tokens=gemma3_case.TOKENS, do_sample=False,
                                    min_new_tokens=gemma3_case.TOKENS)  # fmt: skip
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_gemma3_in_two_slices_or_two_stages_gives_transformers_tokens(gemma3, parallel):
    """In two stages its first stage holds sliding-window layers alone (layers 0 and 1 of 3, window 8), the second
    its full attention layer: the blocks a window has passed stay for that layer (the scheduler sliding by every
    layer's window, not the first stage's), past the window in a long text prompt and in a picture's prompt."""
    cases = [(gemma3_case.ONE, [gemma3_case.NOISE]), (gemma3_case.TWO, [gemma3_case.OTHER, gemma3_case.RED]),
             ("word " * 60, [])]  # fmt: skip
    llm = LLM(str(gemma3), max_num_seqs=4, num_kv_blocks=64, **parallel)
    try:
        outputs = llm.generate([gemma3_case.prompt(text, *images) for text, images in cases], gemma3_case.GREEDY)
    finally:
        llm.engine.close()
    assert gemma3_case.tokens(outputs) == [gemma3_greedy(gemma3, text, images) for text, images in cases]


@pytest.fixture(scope="module")
def qwen_reference(tmp_path_factory):
    """The tiny Qwen3.5 and transformers' greedy tokens on it (test_qwen3_5_generate's fixtures, called here)."""
    checkpoint = qwen_case.qwen.__wrapped__(tmp_path_factory)
    return checkpoint, greedy_references(*qwen_case.hf.__wrapped__(checkpoint), qwen_case.TOKENS)


@pytest.mark.parametrize("budget", [512, 5], ids=["whole", "chunked"])
@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_qwen3_5_in_two_slices_or_two_stages_gives_transformers_tokens(qwen_reference, parallel, budget):
    checkpoint, reference = qwen_reference
    llm = LLM(str(checkpoint), max_num_seqs=4, num_kv_blocks=64, max_num_batched_tokens=budget, **parallel)
    try:
        outputs = llm.generate([prompt(text, *images) for text, images in qwen_case.CASES], qwen_case.GREEDY)
    finally:
        llm.engine.close()
    assert tokens(outputs) == [reference(text, images) for text, images in qwen_case.CASES]
