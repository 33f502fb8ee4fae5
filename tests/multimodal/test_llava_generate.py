"""LLaVA end to end through the offline API (vLLM's `{"prompt", "multi_modal_data": {"image": ...}}`), against
`LlavaForConditionalGeneration.generate` on the HF processor's inputs for the same tiny random checkpoint
(tests/tiny_models.make_tiny_llava): greedy tokens identical with one and with two images, beside text-only prompts
in one batch, through a chunked prefill that splits an image's placeholders, and through a prefix hit on the same
image; a different image at the same place shares no block past the text before it; and the refusals (no vision
encoder, placeholders and images that do not pair up)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.common.errors import InvalidInput
from tests.multimodal.pictures import random_image
from tests.tiny_models import make_tiny_llama
from tests.tiny_vision_models import IMAGE_TOKEN, make_tiny_llava

TOKENS = 8
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)


RED, NOISE, OTHER = Image.new("RGB", (40, 30), (200, 30, 30)), random_image(37, 23, 1), random_image(50, 64, 2)
# Prompts long enough that the blocks (16 tokens) before and after an image are whole
ONE = f"the words before the picture come first {IMAGE_TOKEN} and then what it shows is said"
TWO = f"first {IMAGE_TOKEN} a picture, and second {IMAGE_TOKEN} another one"


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "llava")


@pytest.fixture(scope="module")
def hf(llava):
    """transformers' LLaVA on the checkpoint, and the checkpoint's own processor."""
    model = LlavaForConditionalGeneration.from_pretrained(llava, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), AutoProcessor.from_pretrained(llava)


@pytest.fixture(scope="module")
def reference(hf):
    """Greedy tokens of transformers' LLaVA for (text, images), its inputs from the checkpoint's own processor."""
    hf, processor = hf

    def greedy(text: str, images: list[Image.Image]) -> list[int]:
        inputs = processor(text=text, images=images or None, return_tensors="pt")
        with torch.inference_mode():
            out = hf.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    return greedy


@pytest.fixture(scope="module")
def llm(llava) -> LLM:
    return LLM(str(llava), max_num_seqs=4, num_kv_blocks=64)


def prompt(text: str, *images: Image.Image) -> dict:
    return {"prompt": text, "multi_modal_data": {"image": list(images)}} if images else {"prompt": text}


def tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def test_one_and_two_images_beside_text_only_prompts_give_transformers_tokens(llm, reference):
    cases = [(ONE, [NOISE]), (TWO, [OTHER, RED]), ("a prompt without a picture", [])]
    outputs = llm.generate([prompt(text, *images) for text, images in cases], GREEDY)
    assert tokens(outputs) == [reference(text, images) for text, images in cases]
    assert outputs[0].prompt_token_ids.count(320) == 4 and outputs[1].prompt_token_ids.count(320) == 8


def test_a_chunked_prefill_across_an_image_gives_the_same_tokens(llava, reference):
    chunked = LLM(str(llava), max_num_seqs=2, num_kv_blocks=64, max_num_batched_tokens=8, enable_prefix_caching=False)
    assert tokens(chunked.generate([prompt(ONE, NOISE), prompt(TWO, RED, OTHER)], GREEDY)) == [
        reference(ONE, [NOISE]), reference(TWO, [RED, OTHER])
    ]  # fmt: skip


def test_the_same_image_again_is_a_prefix_hit_and_another_one_shares_only_the_text_before_it(llm, reference):
    first = llm.generate(prompt(ONE, RED), GREEDY)[0]
    again = llm.generate(prompt(ONE, RED), GREEDY)[0]
    other = llm.generate(prompt(ONE, OTHER), GREEDY)[0]
    image_at = first.prompt_token_ids.index(320)
    assert again.metrics.num_cached_tokens > image_at + 4  # blocks past the image's were shared
    assert other.metrics.num_cached_tokens == image_at // 16 * 16  # only the whole blocks before the image
    assert tokens([first, again]) == [reference(ONE, [RED])] * 2 and tokens([other]) == [reference(ONE, [OTHER])]


def test_the_first_tokens_logprobs_are_transformers_for_each_image_and_follow_the_image(llm, hf):
    """Greedy tokens of a tiny random model barely depend on its images: the first token's logprobs show that the
    pixels reach the model, each image's as transformers' do."""
    model, processor = hf
    expected, ours = {}, {}
    for name, image in (("red", RED), ("noise", NOISE)):
        inputs = processor(text=ONE, images=[image], return_tensors="pt")
        with torch.inference_mode():
            expected[name] = model(**inputs).logits[0, -1].log_softmax(-1)
        out = llm.generate(prompt(ONE, image), SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]
        (first,) = out.outputs[0].logprobs
        ours[name] = dict(first.top)
        for token, logprob in first.top:
            assert abs(logprob - float(expected[name][token])) < 1e-5, (name, token)
    # The images move those logprobs far more than the tolerance: the check above tells one image from the other
    moved = max(abs(ours["red"][t] - float(expected["noise"][t])) for t in ours["red"])
    assert moved > 1e-3, moved


def test_placeholders_and_images_must_pair_up(llm):
    with pytest.raises(InvalidInput, match="1 image placeholder"):
        llm.generate(prompt(ONE, RED, OTHER), GREEDY)
    with pytest.raises(InvalidInput, match="not taken"):
        llm.generate({"prompt": ONE, "multi_modal_data": {"video": [b"..."]}}, GREEDY)


def test_a_model_without_a_vision_encoder_refuses_images(tmp_path):
    text_only = LLM(str(make_tiny_llama(tmp_path / "llama")), num_kv_blocks=16)
    with pytest.raises(InvalidInput, match="takes no images"):
        text_only.generate(prompt("hello <image>", RED), GREEDY)
