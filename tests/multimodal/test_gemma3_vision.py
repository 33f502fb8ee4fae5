"""Gemma 3 with its vision tower, end to end through the offline API, against transformers'
`Gemma3ForConditionalGeneration` on the Gemma3Processor's inputs for the same tiny random checkpoint
(tests/tiny_vision_models.make_tiny_gemma3_vision): the prompt's ids (its <start_of_image> expanded with the blank
lines around it joined to the prompt's newlines, as the processor's text gives them), the encoder's soft tokens,
and greedy tokens and first logprobs with one and two images, beside a text-only prompt, through chunked prefills
that would cut an image's run (its tokens attend to each other both ways: a chunk never ends inside one) and through
a prefix hit that ends inside an image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Gemma3ForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.backends.cpu import CpuBackend
from sagellm.common.errors import FieldError
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.multimodal.encoder_runner import EncoderRunner
from sagellm.runtime.multimodal.prompt_media import PromptMedia
from tests.multimodal.pictures import random_image
from tests.oracle import run_to_end
from tests.tiny_vision_models import make_tiny_gemma3_vision

TOKENS = 8
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
BOI = "<start_of_image>"


RED, NOISE, OTHER = Image.new("RGB", (40, 30), (200, 30, 30)), random_image(37, 23, 1), random_image(50, 64, 2)
# A newline before an image joins its blank lines ("\n" + "\n\n" is one token), text right after it does not
ONE = f"the words before the picture come first\n{BOI}and then what it shows is said"
TWO = f"first {BOI} a picture, and second\n\n{BOI}\nanother one"


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> Path:
    return make_tiny_gemma3_vision(tmp_path_factory.mktemp("gemma3") / "gemma3")


@pytest.fixture(scope="module")
def hf(gemma3):
    model = Gemma3ForConditionalGeneration.from_pretrained(gemma3, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), AutoProcessor.from_pretrained(gemma3)


@pytest.fixture(scope="module")
def reference(hf):
    """Greedy tokens of transformers' Gemma 3 for (text, images), its inputs from the checkpoint's processor."""
    model, processor = hf

    def greedy(text: str, images: list[Image.Image]) -> list[int]:
        inputs = processor(text=text, images=images or None, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    return greedy


@pytest.fixture(scope="module")
def llm(gemma3) -> LLM:
    return LLM(str(gemma3), max_num_seqs=4, num_kv_blocks=64)


def prompt(text: str, *images: Image.Image) -> dict:
    return {"prompt": text, "multi_modal_data": {"image": list(images)}} if images else {"prompt": text}


def tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def test_prompt_ids_and_soft_tokens_equal_the_processors_and_transformers(gemma3, hf):
    model, processor = hf
    loaded = load_model(gemma3)
    media = PromptMedia.of_model(loaded.config, loaded.processor_files, loaded.tokenizer)
    encoder = EncoderRunner(loaded.config, loaded.weights, CpuBackend())
    for text, images in ((ONE, [NOISE]), (TWO, [OTHER, RED])):
        ids = loaded.tokenizer.encode(text, add_special_tokens=False)
        expanded, features = media.expand(ids, {"image": images})
        inputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
        assert expanded == inputs["input_ids"][0].tolist()
        assert [f.offset for f in features] == [i for i, t in enumerate(inputs["token_type_ids"][0].tolist())
                                                if t and not inputs["token_type_ids"][0, i - 1]]  # fmt: skip
        with torch.inference_mode():
            expected = model.get_image_features(inputs["pixel_values"]).pooler_output  # [images, 16, H]
        ours = torch.cat(encoder.encode(torch.cat([f.encoder_input for f in features])))
        torch.testing.assert_close(ours, expected.flatten(0, 1), atol=1e-5, rtol=1e-5)


def test_one_and_two_images_beside_a_text_only_prompt_give_transformers_tokens(llm, reference):
    cases = [(ONE, [NOISE]), (TWO, [OTHER, RED]), ("a prompt without a picture", [])]
    outputs = llm.generate([prompt(text, *images) for text, images in cases], GREEDY)
    assert tokens(outputs) == [reference(text, images) for text, images in cases]


def test_the_first_tokens_logprobs_are_transformers_for_each_image(llm, hf):
    """The tiny model's greedy tokens barely depend on the image: its first logprobs show each image reaches it, its
    soft tokens attending to each other both ways."""
    model, processor = hf
    for image in (RED, NOISE):
        inputs = processor(text=ONE, images=[image], return_tensors="pt")
        with torch.inference_mode():
            expected = model(**inputs).logits[0, -1].log_softmax(-1)
        out = llm.generate(prompt(ONE, image), SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]
        for token, logprob in out.outputs[0].logprobs[0].top:
            assert abs(logprob - float(expected[token])) < 1e-5, token


@pytest.mark.parametrize("budget", [17, 24])
def test_a_chunked_prefill_never_cuts_an_image_and_gives_the_same_tokens(gemma3, reference, budget):
    """17 tokens a step: a chunk stops before each 16-token image and the next takes it whole; 24: a chunk runs
    into an image and stops before it."""
    chunked = LLM(str(gemma3), max_num_seqs=2, num_kv_blocks=64, max_num_batched_tokens=budget,
                  enable_prefix_caching=False)  # fmt: skip
    assert tokens(chunked.generate([prompt(ONE, NOISE), prompt(TWO, RED, OTHER)], GREEDY)) == [
        reference(ONE, [NOISE]), reference(TWO, [RED, OTHER])
    ]  # fmt: skip


def test_the_same_image_again_is_a_prefix_hit_inside_its_run(llm, hf, reference):
    """16-token blocks: the hit ends inside the image's 16 soft tokens, and the rest of the image is computed
    attending to the cached part and its own both ways."""
    first = llm.generate(prompt(ONE, RED), GREEDY)[0]
    again = llm.generate(prompt(ONE, RED), GREEDY)[0]
    soft = hf[1].tokenizer.convert_tokens_to_ids("<image_soft_token>")
    image_at = first.prompt_token_ids.index(soft)
    assert image_at < 16 * (image_at // 16 + 1) < image_at + 16  # a block boundary inside the image
    assert again.metrics.num_cached_tokens > image_at
    assert tokens([first, again]) == [reference(ONE, [RED])] * 2


def test_pan_and_scan_crops_each_take_their_run_as_the_processor_writes_them(tmp_path):
    """With do_pan_and_scan a wide image adds its crops after it, each its own <start_of_image> run in the
    processor's sentence; the prompt's ids and the greedy tokens equal transformers'. (Gemma3Processor crops only
    when a call asks, whatever the image processor's file says; we crop where the file says so, as vLLM's
    --mm-processor-kwargs would ask.)"""
    crops = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=4,
                 pan_and_scan_min_ratio_to_activate=1.2)  # fmt: skip
    checkpoint = make_tiny_gemma3_vision(tmp_path / "pan", **crops)
    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    wide = random_image(60, 20, 3)  # 3 crops
    inputs = processor(text=ONE, images=[wide], return_tensors="pt", **crops)
    assert inputs["pixel_values"].shape[0] == 4
    with torch.inference_mode():
        expected = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
    out = LLM(str(checkpoint), max_num_seqs=2, num_kv_blocks=64).generate(prompt(ONE, wide), GREEDY)[0]
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert out.outputs[0].token_ids == expected[0, inputs["input_ids"].shape[1] :].tolist()


def test_a_step_budget_below_a_pictures_run_is_refused_naming_it(gemma3):
    with pytest.raises(FieldError, match="max_num_batched_tokens 8.*16 tokens each"):
        LLM(str(gemma3), num_kv_blocks=16, max_num_batched_tokens=8)


def test_a_resume_whose_output_so_far_holds_image_tokens_takes_them_as_tokens(llm, hf):
    """A resumed request's prompt ends with its output so far, tokens as generated (`resumed_tokens`): an image
    token the model wrote there is neither a placeholder to expand nor one more image to pair up. The continuation
    is transformers' on the same sequence (its <start_of_image> there a plain token: only soft tokens take images)."""
    model, processor = hf
    boi, soft = processor.tokenizer.convert_tokens_to_ids([BOI, "<image_soft_token>"])
    prompt_ids = processor.tokenizer.encode(ONE, add_special_tokens=False)
    written = [boi, 7, 9]  # as if the model had written them before its worker died
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
    image = {"image": [NOISE]}
    llm.engine.add_request("resumed", prompt_ids + written, params, resumed_tokens=3, multi_modal_data=image)
    llm.engine.add_request("soft", prompt_ids + [soft], params, resumed_tokens=1, multi_modal_data=image)
    replies = run_to_end(llm.engine)
    inputs = processor(text=ONE, images=[NOISE], return_tensors="pt", add_special_tokens=False)
    ids = torch.cat([inputs["input_ids"], torch.tensor([written])], dim=1)
    types = torch.cat([inputs["token_type_ids"], torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types,
                             pixel_values=inputs["pixel_values"], max_new_tokens=TOKENS, do_sample=False,
                             min_new_tokens=TOKENS)  # fmt: skip
    assert replies["resumed"] == out[0, ids.shape[1] :].tolist()
    assert len(replies["soft"]) == TOKENS
