"""Idefics3 and SmolVLM against transformers on tiny random checkpoints (tests/tiny_vision_models.make_tiny_idefics3:
a SigLIP-style tower read per 16-pixel tile, a pixel shuffle by 2, one linear, beside a Llama text model): the
config records the tower, the loader keeps what the encoder reads, our prompt expansion is the HF processor's
input_ids (the tiles' tags and image tokens), our encoder's embeddings equal `get_image_features` tile by tile, and
through the offline API the first token's logprobs (tiny random models' greedy tokens barely depend on their images)
and the greedy tokens equal transformers' with one and two images beside a text-only prompt, through a chunked
prefill across the tiles, and through a prefix hit on the same image; and the openai SDK's image to SmolVLM through
the chat API gives transformers' tokens for the checkpoint's chat template, and a prompt over the server's
`--limit-mm-per-prompt` is a 400."""

from __future__ import annotations

import base64
import functools
import io
import json
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.backends.cpu import CpuBackend
from sagellm.common.errors import FieldError, InvalidInput
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.models.architectures.vision_weights import vision_weight_shapes
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.multimodal.encoder_runner import EncoderRunner
from sagellm.runtime.multimodal.image_prompts import ImagePrompts
from sagellm.runtime.multimodal.prompt_media import PromptMedia
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.tiny_vision_models import IMAGE_TOKEN, make_tiny_idefics3

TOKENS = 6
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    return Image.fromarray(pixels, "RGB")


# 2 x 2 tiles and the whole image; one tile (small); 1 x 2 tiles and the whole image
WIDE, SMALL, TALL = random_image(40, 30, 0), random_image(12, 9, 1), random_image(20, 41, 2)
ONE = f"User:{IMAGE_TOKEN}what is in the picture, said in a few words?<end_of_utterance>\nAssistant:"
TWO = f"User: first {IMAGE_TOKEN} then {IMAGE_TOKEN} and how do they differ<end_of_utterance>\nAssistant:"


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def checkpoint(request, tmp_path_factory) -> tuple[Path, torch.nn.Module, object]:
    """The checkpoint, transformers' model on it and its own processor."""
    smolvlm = request.param == "smolvlm"
    path = make_tiny_idefics3(tmp_path_factory.mktemp(request.param) / request.param, smolvlm=smolvlm)
    model_class = SmolVLMForConditionalGeneration if smolvlm else Idefics3ForConditionalGeneration
    hf = model_class.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return path, hf, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint[0])


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    return LLM(str(checkpoint[0]), max_num_seqs=4, num_kv_blocks=96)


def prompt(text: str, *images: Image.Image) -> dict:
    return {"prompt": text, "multi_modal_data": {"image": list(images)}} if images else {"prompt": text}


def hf_inputs(processor, text: str, images: list[Image.Image]) -> dict:
    return processor(text=text, images=[images] if images else None, return_tensors="pt")


def test_the_config_and_the_kept_tensors(loaded):
    vision = loaded.config.vision
    assert (vision.tower, vision.projector, vision.scale_factor, vision.grid) == ("siglip", "pixel_shuffle", 2, 4)
    assert vision.tokens_per_image == 4 and vision.activation == "gelu_tanh" and vision.feature_layers == (2,)
    kept = {name for name in loaded.weights if name.startswith(("vision_tower.", "multi_modal_projector."))}
    assert kept == set(vision_weight_shapes(vision))


def test_the_prompt_expands_as_the_processors_input_ids(checkpoint):
    path, _, processor = checkpoint
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    settings = [json.loads((path / name).read_text()) for name in ("preprocessor_config.json", "processor_config.json")]
    media = PromptMedia([ImagePrompts.from_settings(*settings, image_token, 4, encode)])
    for text, images in ((ONE, [WIDE]), (ONE, [SMALL]), (TWO, [TALL, WIDE])):
        ids, features = media.expand(tokenizer.encode(text), {"image": images})
        expected = hf_inputs(processor, text, images)
        assert ids == expected["input_ids"][0].tolist()
        tiles = expected["pixel_values"][0]  # [tiles, 3, 16, 16]
        assert [f.length for f in features] == [4] * len(tiles)
        assert all(torch.equal(f.encoder_input[0], tile) for f, tile in zip(features, tiles))
        assert all(set(ids[f.offset : f.end]) == {image_token} for f in features)


def test_the_encoder_gives_transformers_image_features(checkpoint, loaded):
    _, hf, processor = checkpoint
    inputs = hf_inputs(processor, TWO, [TALL, WIDE])
    with torch.inference_mode():
        expected = hf.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output
    ours = EncoderRunner(loaded.config, loaded.weights, CpuBackend()).encode(inputs["pixel_values"][0])
    torch.testing.assert_close(torch.cat(ours), torch.cat(list(expected)).reshape(-1, 64), rtol=1e-5, atol=1e-5)


def test_the_first_tokens_logprobs_are_transformers_for_each_image(checkpoint, llm):
    _, hf, processor = checkpoint
    first = {}
    for name, images in (("wide", [WIDE]), ("small", [SMALL])):
        inputs = hf_inputs(processor, ONE, images)
        with torch.inference_mode():
            expected = hf(**inputs).logits[0, -1].log_softmax(-1)
        out = llm.generate(prompt(ONE, *images), SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        (top,) = out.outputs[0].logprobs
        first[name] = dict(top.top)
        for token, logprob in top.top:
            assert abs(logprob - float(expected[token])) < 1e-5, (name, token)
    moved = max(abs(first["wide"][t] - first["small"].get(t, -100.0)) for t in first["wide"])
    assert moved > 1e-3, "the images move the logprobs far more than the tolerance"


def reference(hf, processor, text: str, images: list[Image.Image]) -> list[int]:
    inputs = hf_inputs(processor, text, images)
    with torch.inference_mode():
        out = hf.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_images_beside_a_text_only_prompt_chunked_and_again_give_transformers_tokens(checkpoint, llm):
    path, hf, processor = checkpoint
    cases = [(ONE, [WIDE]), (TWO, [TALL, SMALL]), ("User: no picture here<end_of_utterance>\nAssistant:", [])]
    expected = [reference(hf, processor, text, images) for text, images in cases]
    outputs = llm.generate([prompt(text, *images) for text, images in cases], GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    again = llm.generate(prompt(ONE, WIDE), GREEDY)[0]
    assert again.metrics.num_cached_tokens >= 16 and again.outputs[0].token_ids == expected[0]  # a prefix hit
    chunked = LLM(str(path), max_num_seqs=2, num_kv_blocks=96, max_num_batched_tokens=8, enable_prefix_caching=False)
    outputs = chunked.generate([prompt(text, *images) for text, images in cases[:2]], GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected[:2]


@pytest.mark.parametrize("checkpoint", ["smolvlm"], indirect=True)
def test_the_openai_sdk_sends_smolvlm_an_image_and_gets_transformers_tokens_within_the_image_limit(
    checkpoint, tmp_path
):
    path, hf, processor = checkpoint
    picture = io.BytesIO()
    WIDE.save(picture, "PNG")
    url = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    parts = [{"type": "image"}, {"type": "text", "text": "what is this?"}]
    text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    expected = reference(hf, processor, text, [WIDE])
    one_image = {"engine.limit_mm_per_prompt": {"image": 1}}  # vLLM's --limit-mm-per-prompt
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path), path, **one_image) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        image = {"type": "image_url", "image_url": {"url": url}}

        def chat(*images: dict):
            return client.chat.completions.create(
                model=client.models.list().data[0].id,
                messages=[{"role": "user", "content": [*images, {"type": "text", "text": "what is this?"}]}],
                max_tokens=TOKENS, temperature=0, extra_body={"return_token_ids": True},
            )  # fmt: skip

        reply = chat(image)
        with pytest.raises(openai.BadRequestError, match="limit_mm_per_prompt") as refused:
            chat(image, image)  # refused at the door, before either image is read
        assert refused.value.body["param"] == "messages[0].content[1].image_url"
    assert reply.choices[0].token_ids == expected
    assert reply.usage.prompt_tokens == hf_inputs(processor, text, [WIDE])["input_ids"].shape[1]


@pytest.mark.parametrize("checkpoint", ["idefics3"], indirect=True)
def test_an_engine_takes_at_most_its_limit_of_images_a_prompt(checkpoint):
    capped = LLM(str(checkpoint[0]), max_num_seqs=1, num_kv_blocks=64, limit_mm_per_prompt={"image": 1})
    assert capped.generate(prompt(ONE, SMALL), GREEDY)[0].outputs[0].token_ids
    with pytest.raises(InvalidInput, match=r"at most 1 image\(s\) .* \(limit_mm_per_prompt\); this one has 2"):
        capped.generate(prompt(TWO, SMALL, WIDE), GREEDY)
    for wrong in ({"images": 1}, {"image": -1}, {"image": True}):
        with pytest.raises(FieldError, match="limit_mm_per_prompt (takes|must be)"):
            EngineConfig(model="m", limit_mm_per_prompt=wrong)
