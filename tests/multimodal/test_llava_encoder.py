"""LLaVA's model side against transformers on a tiny random checkpoint (a CLIP tower and LLaVA's projector beside a
Llama text model, tests/tiny_models.make_tiny_llava): the config records the tower, the loader keeps the tensors the
encoder reads (and only those), our encoder graph's embeddings for one and two images equal
`LlavaForConditionalGeneration.get_image_features` on the pixel values our preprocessing gives (which equal the HF
processor's), also for two feature layers joined with the class row kept, and a text-only prompt's greedy tokens
through our engine are transformers'. Beside them, the decoder's `scatter_rows` op, lowered alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.backends.cpu import CpuBackend
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.execution_graph.lowering import LoweringContext, lower
from sagellm.runtime.models.architectures.hf_config import config_from_hf
from sagellm.runtime.models.architectures.hf_vision_config import vision_from_hf
from sagellm.runtime.models.architectures.vision_weights import vision_weight_shapes
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.vision_config import VisionConfig
from sagellm.runtime.multimodal.encoder_runner import EncoderRunner
from sagellm.runtime.multimodal.image_processing import image_processor_for
from tests.oracle import hf_greedy, random_prompts
from tests.tiny_vision_models import IMAGE_TOKEN, make_tiny_llava

TOKENS = 8


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    return Image.fromarray(pixels, "RGB")


IMAGES = [random_image(37, 23, 0), random_image(50, 64, 1)]


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[Path, LlavaForConditionalGeneration]:
    path = make_tiny_llava(tmp_path_factory.mktemp("llava") / "llava")
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return path, hf.eval()


@pytest.fixture(scope="module")
def loaded(llava):
    return load_model(llava[0], load_tokenizer=False)


def pixel_values(path: Path, images: list[Image.Image]) -> torch.Tensor:
    """Our preprocessing of `images`, configured from the checkpoint's files."""
    pre, proc = (
        json.loads((path / name).read_text()) for name in ("preprocessor_config.json", "processor_config.json")
    )
    return image_processor_for(pre, proc).preprocess(images).pixel_values


def test_the_config_records_the_vision_tower(loaded):
    config = loaded.config
    assert config.architecture == "llama" and config.vocab_size == 321
    assert config.vision == VisionConfig(
        tower="clip", hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_channels=3, patch_size=14,
        image_size=28, layer_norm_eps=1e-5, activation="quick_gelu", feature_layers=(2,), drop_class=True,
        projector="llava_mlp", projector_activation="gelu", projector_bias=True, text_hidden_size=64,
        image_token_id=320,
    )  # fmt: skip
    assert config.vision.num_layers_run == 2 and config.vision.tokens_per_image == 4


def test_the_loader_keeps_the_tensors_the_encoder_reads(loaded):
    """The tower's last layer and post-layernorm are not read (hidden state -2 is layer 1's output), so not kept."""
    kept = {name for name in loaded.weights if name.startswith(("vision_tower.", "multi_modal_projector."))}
    assert kept == set(vision_weight_shapes(loaded.config.vision))
    assert not any(".layers.2." in name or "post_layernorm" in name for name in kept)
    assert loaded.weights["vision_tower.embeddings.patch_embedding.weight"].shape == (32, 3, 14, 14)


def test_our_pixel_values_and_image_tokens_are_the_hf_processors(llava):
    path, _ = llava
    processor = AutoProcessor.from_pretrained(path)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                           "text": "what is it?"}]}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
    assert text.count(IMAGE_TOKEN) == 1
    hf = processor(text=text, images=IMAGES[:1], return_tensors="pt")
    assert torch.equal(pixel_values(path, IMAGES[:1]), hf["pixel_values"])
    assert int((hf["input_ids"] == 320).sum()) == 4


@pytest.mark.parametrize("count", [1, 2])
def test_image_embeddings_equal_transformers(llava, loaded, count):
    path, hf = llava
    pixels = pixel_values(path, IMAGES[:count])
    ours = EncoderRunner(loaded.config, loaded.weights, CpuBackend()).encode(pixels)
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=pixels).pooler_output
    assert len(ours) == len(expected) == count
    for got, want in zip(ours, expected):
        assert got.shape == want.shape == (4, 64) and got.dtype == torch.float32
        assert (got - want).abs().max() < 1e-5


def test_feature_layers_joined_with_the_class_row_kept_equal_transformers(tmp_path):
    """Two hidden states read (the embeddings and the last layer's), joined along features, the class row kept."""
    path = make_tiny_llava(tmp_path / "llava", vision_feature_layer=[0, -1], vision_feature_select_strategy="full")
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model = load_model(path, load_tokenizer=False)
    assert model.config.vision.feature_layers == (0, 3) and not model.config.vision.drop_class
    pixels = pixel_values(path, IMAGES)
    ours = EncoderRunner(model.config, model.weights, CpuBackend()).encode(pixels)
    with torch.no_grad():
        expected = hf.eval().get_image_features(pixel_values=pixels).pooler_output
    for got, want in zip(ours, expected):
        assert got.shape == want.shape == (5, 64)
        assert (got - want).abs().max() < 1e-5


def test_a_text_only_prompt_gives_transformers_greedy_tokens(llava):
    path, hf = llava
    prompts = random_prompts(320, [5, 17, 9])  # never the image token (320)
    llm = LLM(str(path), backend="cpu", block_size=4, num_kv_blocks=64)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(hf, p, TOKENS) for p in prompts]


def test_a_llava_of_an_unsupported_text_model_or_tower_is_refused():
    config = {"architectures": ["LlavaForConditionalGeneration"], "text_config": {"model_type": "llama",
              "hidden_size": 64}, "vision_config": {"model_type": "siglip_vision_model"}}  # fmt: skip
    with pytest.raises(ModelLoadError, match="siglip_vision_model"):
        vision_from_hf(config, 64)
    with pytest.raises(ModelLoadError, match="mm_tokens_per_image 256"):  # transformers' defaults do not pool
        vision_from_hf({"architectures": ["Gemma3ForConditionalGeneration"]}, 64)
    assert vision_from_hf({"architectures": ["Qwen3_5ForConditionalGeneration"]}, 64) is None  # served text only
    gemma = dict(config, text_config={"model_type": "gemma2"})
    with pytest.raises(ModelLoadError, match="'gemma2' text model"):
        config_from_hf(gemma, None, Path("config.json"))


def test_scatter_rows_replaces_the_rows_given_and_is_the_identity_without():
    g = Graph()
    hidden, rows, embeds = (g.add("input", id=name, name=name) for name in ("hidden", "rows", "embeds"))
    g.add("output", [g.add("scatter_rows", [hidden, rows, embeds])], id="out", name="out")
    context = LoweringContext(backend=CpuBackend(), weights={}, kv_caches=[], rope_tables={}, head_dim=8)
    plan = lower(g, context)
    x, e = torch.randn(6, 4), torch.randn(2, 4)
    out = plan.run(hidden=x, rows=torch.tensor([1, 4]), embeds=e)["out"]
    assert torch.equal(out[[1, 4]], e) and torch.equal(out[[0, 2, 3, 5]], x[[0, 2, 3, 5]])
    assert plan.run(hidden=x, rows=None, embeds=None)["out"] is x
