"""Qwen3.5 with its vision tower, against transformers' `Qwen3_5ForConditionalGeneration` and the Qwen3VLProcessor for
the same tiny random checkpoint (tests/tiny_qwen_vl_models.make_tiny_qwen3_5_vision): the chat's prompt ids (each
<|image_pad|> between <|vision_start|> and <|vision_end|> repeated once per merged square of the picture's patches),
the patch rows and token grids (image_grid_thw, merged), the encoder's embeddings (get_image_features) for one and
two pictures of different shapes in one run, the pictures' hashes (their grids in them), and a text-only request's
greedy tokens. Greedy tokens with pictures need the text model's multimodal rotary positions, tested where those
are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Qwen3_5ForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.backends.cpu import CpuBackend
from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.architectures.hf_vision_config import vision_from_hf
from sagellm.runtime.models.architectures.vision_weights import vision_weight_shapes
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.multimodal.encoder_cache import EncoderCache
from sagellm.runtime.multimodal.encoder_runner import EncoderRunner
from sagellm.runtime.multimodal.prompt_media import PromptMedia
from tests.multimodal.pictures import random_image
from tests.tiny_qwen_vl_models import make_tiny_qwen3_5_vision, qwen3_5_processor

TOKENS = 8
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)


# 48 x 32: 2 x 4 patches, 2 tokens; 64 x 64: 4 x 4 patches, 4 tokens; 100 x 70 (resized to 96 x 64): 4 x 6, 6 tokens
WIDE, SQUARE, ODD = random_image(48, 32, 1), random_image(64, 64, 2), random_image(100, 70, 3)


def chat(*parts: str | Image.Image) -> list[dict]:
    content = [{"type": "image"} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


ONE = chat(WIDE, "what is in the picture?")
TWO = chat("first", SQUARE, "then", ODD, "which is brighter?")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return make_tiny_qwen3_5_vision(tmp_path_factory.mktemp("qwen3_5") / "qwen3_5")


@pytest.fixture(scope="module")
def hf(qwen):
    model = Qwen3_5ForConditionalGeneration.from_pretrained(qwen, dtype=torch.float32)
    return model.eval(), qwen3_5_processor(qwen)


@pytest.fixture(scope="module")
def ours(qwen):
    loaded = load_model(qwen)
    media = PromptMedia.of_model(loaded.config, loaded.processor_files, loaded.tokenizer)
    return loaded, media, EncoderRunner(loaded.config, loaded.weights, CpuBackend())


def processed(hf, ours, messages: list[dict], images: list[Image.Image]):
    """(the HF processor's inputs, our expanded ids and features) for a chat rendered by the processor's template."""
    processor = hf[1]
    loaded, media, _ = ours
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
    ids, features = media.expand(loaded.tokenizer.encode(text, add_special_tokens=False), {"image": images})
    return inputs, ids, features


CASES = [(ONE, [WIDE]), (TWO, [SQUARE, ODD])]


@pytest.mark.parametrize(("messages", "images"), CASES)
def test_prompt_ids_are_the_processors_each_image_pad_one_per_merged_square(hf, ours, messages, images):
    inputs, ids, features = processed(hf, ours, messages, images)
    assert ids == inputs["input_ids"][0].tolist()
    pad = hf[1].image_token_id
    assert [(f.offset, f.length) for f in features] == _runs(ids, pad)
    for f in features:  # each run between <|vision_start|> and <|vision_end|>
        assert ids[f.offset - 1] == hf[1].vision_start_token_id and ids[f.end] == hf[1].vision_end_token_id


@pytest.mark.parametrize(("messages", "images"), CASES)
def test_patch_rows_and_token_grids_are_the_processors(hf, ours, messages, images):
    inputs, _, features = processed(hf, ours, messages, images)
    assert torch.equal(torch.cat([f.encoder_input for f in features]), inputs["pixel_values"])
    merged = inputs["image_grid_thw"] // torch.tensor([1, 2, 2])
    assert [f.grid for f in features] == [tuple(g) for g in merged.tolist()]
    assert [f.length for f in features] == merged.prod(-1).tolist()


@pytest.mark.parametrize(("messages", "images"), CASES)
def test_embeddings_equal_transformers_image_features(hf, ours, messages, images):
    """One picture, and two of different shapes in one encoder run (their rows stacked, attention within each)."""
    inputs, _, features = processed(hf, ours, messages, images)
    encoder = ours[2]
    encoded = encoder.encode(torch.cat([f.encoder_input for f in features]), [f.grid for f in features])
    with torch.inference_mode():
        expected = hf[0].model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    assert [e.shape[0] for e in encoded] == [f.length for f in features]
    torch.testing.assert_close(torch.cat(encoded), torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_the_encoder_cache_encodes_a_steps_pictures_by_their_grids(hf, ours):
    """Through the engine's cache (its pictures in one pass, each with its feature's grid), the same rows."""
    inputs, _, features = processed(hf, ours, TWO, [SQUARE, ODD])
    cache = EncoderCache({"image": ours[2]}, capacity_rows=64)
    with torch.inference_mode():
        expected = hf[0].model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    torch.testing.assert_close(torch.cat(cache.embeddings_of(features)), torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_the_same_patch_rows_under_another_grid_hash_apart(ours):
    """A plain picture 48 x 32 and its 32 x 48 turn give the same patch rows (every patch alike) in grids 1 x 2 and
    2 x 1, which encode differently (positions, rope): their features must not share a cache entry or KV blocks."""
    _, media, _ = ours
    wide, tall = Image.new("RGB", (64, 32), (90, 160, 30)), Image.new("RGB", (32, 64), (90, 160, 30))
    (a,), (b,) = (media.modalities["image"].expansions([image])[0].features for image in (wide, tall))
    assert torch.equal(a.encoder_input, b.encoder_input) and a.grid == (1, 1, 2) and b.grid == (1, 2, 1)
    assert a.hash != b.hash


def test_the_encoder_refuses_rows_without_their_grids(ours):
    _, media, encoder = ours
    (feature,) = media.modalities["image"].expansions([WIDE])[0].features
    with pytest.raises(InvalidInput, match="token grid"):
        encoder.encode(feature.encoder_input)
    with pytest.raises(InvalidInput, match="patch rows of shape"):
        encoder.encode(feature.encoder_input, [(1, 2, 2)])


def test_the_loader_keeps_the_towers_tensors_under_the_graphs_names(ours):
    """`model.visual.*` read as the tower's, its Conv3d's weight whole (the binder flattens it into a linear's)."""
    loaded = ours[0]
    shapes = vision_weight_shapes(loaded.config.vision)
    assert shapes["vision_tower.patch_embed.proj.weight"] == (32, 3, 2, 16, 16)
    assert {name: tuple(loaded.weights[name].shape) for name in shapes} == shapes
    assert not [name for name in loaded.weights if "visual" in name]


def test_a_text_only_request_gives_transformers_greedy_tokens(qwen, hf):
    model, processor = hf
    text = "a prompt without a picture"
    inputs = processor.tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
    ours = LLM(str(qwen), max_num_seqs=2, num_kv_blocks=32).generate({"prompt": text}, GREEDY)[0]
    assert ours.outputs[0].token_ids == out[0, inputs["input_ids"].shape[1] :].tolist()


def test_the_config_takes_images_unless_it_has_no_tower(qwen, ours):
    vision = ours[0].config.vision
    assert (vision.tower, vision.spatial_merge_size, vision.temporal_patch_size) == ("qwen3_5", 2, 2)
    assert vision.tokens_per_image == 16  # the processor's longest_edge, 128 x 128 pixels, in 32-pixel squares
    config = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "vision_config": {"out_hidden_size": 64}}
    assert vision_from_hf(config, 64).tower == "qwen3_5"
    assert vision_from_hf({"architectures": ["Qwen3_5ForConditionalGeneration"]}, 64) is None
    with pytest.raises(ModelLoadError, match="out_hidden_size 3584 is not the text model's width 64"):
        vision_from_hf({"architectures": ["Qwen3_5ForConditionalGeneration"], "vision_config": {}}, 64)


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each run of `token` in `ids`."""
    starts = [i for i, t in enumerate(ids) if t == token and (i == 0 or ids[i - 1] != token)]
    return [(i, next((j for j in range(i, len(ids)) if ids[j] != token), len(ids)) - i) for i in starts]
