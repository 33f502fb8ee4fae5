"""Gemma 4 with its vision tower, end to end through the offline API, against transformers'
`Gemma4ForConditionalGeneration` on the Gemma4Processor's inputs for the same tiny random checkpoint
(tests/tiny_vision_models.make_tiny_gemma4_vision): the prompt's ids (its image token expanded to <boi>, as many
soft tokens as the image's shape gives, <eoi>), the preprocessing (patches and their positions), the encoder's soft
tokens (also with clipped linears and standardization), and greedy tokens and first logprobs with one and two
images of different shapes beside a text-only prompt, through chunked prefills that cut an image's run and a prefix
hit that ends inside one (the tiny model's pictures attend causally, as E2B's: use_bidirectional_attention null);
and with use_bidirectional_attention "vision" (26B-A4B's, 31B's: pictures attend both ways in the sliding layers
alone), tokens and logprobs through whole-picture chunks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Gemma4ForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.backends.cpu import CpuBackend
from sagellm.common.errors import FieldError
from sagellm.runtime.models.architectures.hf_vision_config import vision_from_hf
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.multimodal.encoder_runner import EncoderRunner
from sagellm.runtime.multimodal.gemma4_images import Gemma4ImageProcessor
from sagellm.runtime.multimodal.prompt_media import PromptMedia
from tests.multimodal.pictures import random_image
from tests.tiny_vision_models import gemma4_processor, make_tiny_gemma4_vision

TOKENS = 8
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
IMAGE = "<|image|>"


# Three shapes: 40 x 30 (60 soft tokens), 37 x 23 (a resize down), 30 x 90 (tall: 54)
RED, NOISE, OTHER = Image.new("RGB", (40, 30), (200, 30, 30)), random_image(37, 23, 1), random_image(30, 90, 2)
ONE = f"the words before the picture come first {IMAGE} and then what it shows is said"
TWO = f"first {IMAGE} a picture, and second\n\n{IMAGE}\nanother one"
ENDS_SOON = f"the words before the picture come first {IMAGE} so"


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory) -> Path:
    return make_tiny_gemma4_vision(tmp_path_factory.mktemp("gemma4") / "gemma4")


@pytest.fixture(scope="module")
def hf(gemma4):
    model = Gemma4ForConditionalGeneration.from_pretrained(gemma4, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), gemma4_processor(gemma4)


def inputs_of(processor, text: str, images: list[Image.Image]):
    return processor(text=text, images=images or None, return_tensors="pt", add_special_tokens=False)


@pytest.fixture(scope="module")
def reference(hf):
    """Greedy tokens of transformers' Gemma 4 for (text, images), its inputs from the checkpoint's processor."""
    model, processor = hf

    def greedy(text: str, images: list[Image.Image]) -> list[int]:
        inputs = inputs_of(processor, text, images)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    return greedy


@pytest.fixture(scope="module")
def llm(gemma4) -> LLM:
    return LLM(str(gemma4), max_num_seqs=4, num_kv_blocks=64)


def prompt(text: str, *images: Image.Image) -> dict:
    return {"prompt": text, "multi_modal_data": {"image": list(images)}} if images else {"prompt": text}


def tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def soft_tokens_equal_transformers(checkpoint: Path, model, processor) -> None:
    """The prompt's ids and the preprocessing equal the processor's, the encoder's soft tokens transformers'."""
    loaded = load_model(checkpoint)
    media = PromptMedia.of_model(loaded.config, loaded.processor_files, loaded.tokenizer)
    encoder = EncoderRunner(loaded.config, loaded.weights, CpuBackend())
    images = Gemma4ImageProcessor.from_config(loaded.processor_files.preprocessor, {})
    for text, pictures in ((ONE, [NOISE]), (TWO, [OTHER, RED])):
        ids = loaded.tokenizer.encode(text, add_special_tokens=False)
        expanded, features = media.expand(ids, {"image": pictures})
        inputs = inputs_of(processor, text, pictures)
        assert expanded == inputs["input_ids"][0].tolist()
        kinds = inputs["mm_token_type_ids"][0].tolist()
        assert [(f.offset, f.length) for f in features] == [
            (i, kinds[i:].index(0) if 0 in kinds[i:] else len(kinds) - i)
            for i, kind in enumerate(kinds)
            if kind and not kinds[i - 1]
        ]
        ours = images.preprocess(pictures)
        assert torch.equal(ours.pixel_values, inputs["pixel_values"])
        assert torch.equal(ours.image_position_ids, inputs["image_position_ids"])
        with torch.inference_mode():
            expected = model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"])
        encoded = encoder.encode(torch.cat([f.encoder_input for f in features]))
        assert [e.shape[0] for e in encoded] == [f.length for f in features]
        torch.testing.assert_close(torch.cat(encoded), torch.cat(expected.pooler_output), atol=1e-5, rtol=1e-5)


def test_prompt_ids_pixels_and_soft_tokens_equal_the_processors_and_transformers(gemma4, hf):
    soft_tokens_equal_transformers(gemma4, *hf)


def test_clipped_linears_and_standardization_are_transformers(tmp_path):
    """A tower whose linears clamp their inputs and outputs (bounds that bite) and whose pooled rows are
    standardized: the soft tokens are still transformers'."""
    checkpoint = make_tiny_gemma4_vision(tmp_path / "clipped", use_clipped_linears=True, standardize=True)
    model = Gemma4ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    soft_tokens_equal_transformers(checkpoint, model, gemma4_processor(checkpoint))


def test_one_and_two_images_beside_a_text_only_prompt_give_transformers_tokens(llm, reference):
    cases = [(ONE, [NOISE]), (TWO, [OTHER, RED]), ("a prompt without a picture", [])]
    outputs = llm.generate([prompt(text, *images) for text, images in cases], GREEDY)
    assert tokens(outputs) == [reference(text, images) for text, images in cases]


def test_the_first_tokens_logprobs_are_transformers_for_each_image(llm, hf):
    """The first logprobs show each image reaches the model, and its rows' per-layer embeddings are the pad
    token's, as transformers reads them."""
    model, processor = hf
    firsts = []
    for image in (RED, NOISE):
        inputs = inputs_of(processor, ONE, [image])
        with torch.inference_mode():
            expected = model(**inputs).logits[0, -1].log_softmax(-1)
        out = llm.generate(prompt(ONE, image), SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]
        for token, logprob in out.outputs[0].logprobs[0].top:  # to 1e-4, as the other oracles' logprobs: our
            assert abs(logprob - float(expected[token])) < 1e-4, token  # GEMMs sum in another order than torch's
        firsts.append(out.outputs[0].logprobs[0].top)
    assert firsts[0] != firsts[1]


@pytest.mark.parametrize("budget", [16, 40])
def test_a_chunked_prefill_cutting_images_gives_the_same_tokens(gemma4, reference, budget):
    """Its pictures attend causally: a chunk may end inside an image's run, which the next chunk reads on from."""
    chunked = LLM(str(gemma4), max_num_seqs=2, num_kv_blocks=64, max_num_batched_tokens=budget,
                  enable_prefix_caching=False)  # fmt: skip
    assert tokens(chunked.generate([prompt(ONE, NOISE), prompt(TWO, RED, OTHER)], GREEDY)) == [
        reference(ONE, [NOISE]), reference(TWO, [RED, OTHER])
    ]  # fmt: skip


def test_the_same_image_again_is_a_prefix_hit_inside_its_run(llm, hf, reference):
    """16-token blocks: the hit ends inside the image's soft tokens (the prompt ends soon after them), the rest of
    them computed on from there."""
    first = llm.generate(prompt(ENDS_SOON, RED), GREEDY)[0]
    again = llm.generate(prompt(ENDS_SOON, RED), GREEDY)[0]
    soft = hf[1].tokenizer.convert_tokens_to_ids(IMAGE)
    image_at, length = first.prompt_token_ids.index(soft), first.prompt_token_ids.count(soft)
    assert image_at < again.metrics.num_cached_tokens < image_at + length
    assert tokens([first, again]) == [reference(ENDS_SOON, [RED])] * 2


@pytest.fixture(scope="module")
def both_ways(tmp_path_factory):
    """The tiny model with use_bidirectional_attention "vision" (26B-A4B's and 31B's): in its sliding layers each
    picture's soft tokens attend to one another both ways, in its full attention layers causally."""
    checkpoint = make_tiny_gemma4_vision(tmp_path_factory.mktemp("both") / "both",
                                         text_settings={"use_bidirectional_attention": "vision"})  # fmt: skip
    model = Gemma4ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    return checkpoint, model.eval(), gemma4_processor(checkpoint)


@pytest.mark.parametrize("budget", [512, 80])
def test_pictures_attending_both_ways_in_the_sliding_layers_give_transformers_tokens_and_logprobs(both_ways, budget):
    """Transformers' mask (its processor's mm_token_type_ids given), whose first logprobs differ from a causal
    mask's by 0.4 and more, and from one with every layer's pictures both ways by 1e-4. 80 tokens a step: each
    picture's run (at most 70) is prefilled whole, a chunk stopping before it."""
    checkpoint, model, processor = both_ways
    llm = LLM(str(checkpoint), max_num_seqs=4, num_kv_blocks=64, max_num_batched_tokens=budget,
              enable_prefix_caching=False)  # fmt: skip
    cases = [(ONE, [NOISE]), (TWO, [OTHER, RED]), ("a prompt without a picture", [])]
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True, logprobs=5)
    outputs = llm.generate([prompt(text, *images) for text, images in cases], params)
    for (text, images), out in zip(cases, outputs):
        inputs = inputs_of(processor, text, images)
        with torch.inference_mode():
            expected = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
            first = model(**inputs).logits[0, -1].log_softmax(-1)
        assert out.outputs[0].token_ids == expected[0, inputs["input_ids"].shape[1] :].tolist()
        for token, logprob in out.outputs[0].logprobs[0].top:
            assert abs(logprob - float(first[token])) < 1e-5, token


def test_both_ways_a_step_budget_below_the_processors_most_soft_tokens_is_refused(both_ways):
    """A picture's run is prefilled whole, so a step must hold the most the image processor gives (its
    max_soft_tokens, 70 here), read from the checkpoint's preprocessor_config.json."""
    assert load_model(both_ways[0], load_weights=False).config.vision.tokens_per_image == 70
    with pytest.raises(FieldError, match="max_num_batched_tokens 40.*70 tokens each"):
        LLM(str(both_ways[0]), num_kv_blocks=16, max_num_batched_tokens=40)


def test_other_bidirectional_modes_are_refused_naming_the_key():
    config = {"architectures": ["Gemma4ForConditionalGeneration"], "vision_config": {},
              "text_config": {"use_bidirectional_attention": "all"}}  # fmt: skip
    with pytest.raises(ModelLoadError, match="use_bidirectional_attention 'all'"):
        vision_from_hf(config, 64)
