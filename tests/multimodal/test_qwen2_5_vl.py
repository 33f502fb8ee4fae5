"""Qwen2.5-VL with its vision tower, against transformers' `Qwen2_5_VLForConditionalGeneration` and the
Qwen2_5_VLProcessor for the same tiny random checkpoint (tests/tiny_qwen_vl_models.make_tiny_qwen2_5_vl): the chat's
prompt ids (each <|image_pad|> repeated once per merged square), the patch rows and token grids, the encoder's
embeddings (get_image_features) for one and two pictures of different shapes in one run, their windows really
splitting them; the loader's reading of the checkpoint and of a hub config.json (its text settings at the top level,
Qwen2-VL's rope_scaling, `in_chans`); and generation through the offline LLM: greedy tokens with one and two pictures
beside a text-only prompt, the first token's logprobs, and a chunked prefill whose chunks end inside pictures."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from sagellm import LLM, SamplingParams
from sagellm.backends.cpu import CpuBackend
from sagellm.backends.torch_ops.qwen_vision import GridMetadata, window_metadata
from sagellm.runtime.models.architectures.hf_config import config_from_hf
from sagellm.runtime.models.architectures.vision_weights import vision_weight_shapes
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.multimodal.encoder_runner import EncoderRunner
from sagellm.runtime.multimodal.prompt_media import PromptMedia
from tests.multimodal.pictures import random_image
from tests.multimodal.qwen_vl_cases import PICTURE, greedy_references, prompt, tokens
from tests.tiny_qwen_vl_models import make_tiny_qwen2_5_vl, qwen2_5_vl_processor

TOKENS = 8
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)


# 28-pixel merged squares, windows of 2 x 2 of them: token grids (1, 4, 6) (6 windows), (1, 6, 6) (the most, 36
# tokens: 9 windows), (1, 6, 4); 150 x 100 resized to 140 x 112: (1, 4, 5), its right windows 1 square wide
WIDE, BIG = random_image(168, 112, 1), random_image(168, 168, 2)
TALL, ODD = random_image(112, 168, 3), random_image(150, 100, 4)


def chat(*parts: str | Image.Image) -> list[dict]:
    content = [{"type": "image"} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl") / "qwen2_5_vl")


@pytest.fixture(scope="module")
def hf(qwen):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen, dtype=torch.float32)
    return model.eval(), qwen2_5_vl_processor(qwen)


@pytest.fixture(scope="module")
def reference(hf):
    return greedy_references(*hf, TOKENS)


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


CHATS = [(chat(WIDE, "what is in the picture?"), [WIDE]), (chat("first", ODD, "then", TALL, "which?"), [ODD, TALL])]


@pytest.mark.parametrize(("messages", "images"), CHATS)
def test_prompt_ids_patch_rows_and_grids_are_the_processors(hf, ours, messages, images):
    inputs, ids, features = processed(hf, ours, messages, images)
    assert ids == inputs["input_ids"][0].tolist()
    assert torch.equal(torch.cat([f.encoder_input for f in features]), inputs["pixel_values"])
    merged = inputs["image_grid_thw"] // torch.tensor([1, 2, 2])
    assert [f.grid for f in features] == [tuple(g) for g in merged.tolist()]
    assert [f.length for f in features] == merged.prod(-1).tolist()
    config = hf[0].config
    for f in features:  # each run between <|vision_start|> and <|vision_end|>
        assert ids[f.offset - 1] == config.vision_start_token_id and ids[f.end] == config.vision_end_token_id


@pytest.mark.parametrize(("messages", "images"), CHATS)
def test_embeddings_equal_transformers_image_features(hf, ours, messages, images):
    """One picture, and two of different shapes in one encoder run (their rows stacked, windowed layers attending
    within each window, the full attention layer within each picture)."""
    inputs, _, features = processed(hf, ours, messages, images)
    encoded = ours[2].encode(torch.cat([f.encoder_input for f in features]), [f.grid for f in features])
    with torch.inference_mode():
        expected = hf[0].model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    assert [e.shape[0] for e in encoded] == [f.length for f in features]
    torch.testing.assert_close(torch.cat(encoded), torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_the_windows_split_each_picture_and_change_its_embeddings(ours):
    """ODD's 4 x 5 squares in windows of 2 x 2: six windows, the right ones a square wide; encoded with every layer
    attending over the whole picture, its embeddings differ (so the windows above are what transformers' are)."""
    loaded, media, encoder = ours
    (feature,) = media.modalities["image"].expansions([ODD])[0].features
    assert feature.grid == (1, 4, 5)
    windows = window_metadata(GridMetadata.of([(1, 8, 10)]), merge=2, side=loaded.config.vision.window_tokens)
    assert windows.seq_lens == (16, 16, 8, 16, 16, 8)
    vision = loaded.config.vision
    unwindowed = replace(loaded.config, vision=replace(vision, full_attention_layers=tuple(range(vision.num_layers))))
    whole = EncoderRunner(unwindowed, loaded.weights, CpuBackend()).encode(feature.encoder_input, [feature.grid])[0]
    assert (whole - encoder.encode(feature.encoder_input, [feature.grid])[0]).abs().max() > 1e-3


def test_the_loader_keeps_the_towers_tensors_under_the_graphs_names(ours):
    """`visual.*` (as transformers saves Qwen2.5-VL, as the hub has it) read as the tower's, its Conv3d's weight
    whole and without a bias."""
    loaded = ours[0]
    shapes = vision_weight_shapes(loaded.config.vision)
    assert shapes["vision_tower.patch_embed.proj.weight"] == (32, 3, 2, 14, 14)
    assert {name: tuple(loaded.weights[name].shape) for name in shapes} == shapes
    assert not [name for name in loaded.weights if "visual" in name]
    assert loaded.config.architecture == "qwen2" and loaded.config.qkv_bias
    assert (loaded.config.mrope_section, loaded.config.mrope_interleaved) == ((2, 3, 3), False)


HUB_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 2048,
    "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
    "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
    "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 70, "tie_word_embeddings": True,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "image_token_id": 151655,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}  # fmt: skip


def test_a_hub_config_with_its_text_settings_at_the_top_level(tmp_path):
    """Qwen2.5-VL-3B-Instruct's config.json: the text model Qwen2's (rope_scaling's sections, plain rope's angles),
    the tower's windows of 4 x 4 squares, its full attention layers, `in_chans`; without a preprocessor_config.json,
    Qwen2VLImageProcessor's default max_pixels bounds a picture's tokens."""
    config = config_from_hf(HUB_CONFIG, None, tmp_path / "config.json")
    assert (config.architecture, config.qkv_bias, config.hidden_size, config.rope_theta) == ("qwen2", True, 2048, 1e6)
    assert (config.mrope_section, config.mrope_interleaved, config.rope_scaling) == ((16, 24, 24), False, None)
    vision = config.vision
    assert (vision.tower, vision.num_channels, vision.window_tokens) == ("qwen2_5_vl", 3, 4)
    assert vision.full_attention_layers == (7, 15, 23, 31)
    assert (vision.image_token_id, vision.tokens_per_image) == (151655, 1280)
    with pytest.raises(ModelLoadError, match="window_size 100"):
        config_from_hf(HUB_CONFIG | {"vision_config": HUB_CONFIG["vision_config"] | {"window_size": 100}}, None,
                       tmp_path / "config.json")  # fmt: skip


@pytest.fixture(scope="module")
def llm(qwen) -> LLM:
    return LLM(str(qwen), max_num_seqs=4, num_kv_blocks=128, block_size=4)


ONE = f"user: {PICTURE} what is in the picture?\nassistant:"
TWO = f"user: first {PICTURE} then {PICTURE} which is brighter?\nassistant:"
TEXT = "user: a prompt without a picture\nassistant:"
CASES = [(ONE, [WIDE]), (TWO, [BIG, TALL]), (TEXT, [])]


def test_one_and_two_pictures_beside_a_text_only_prompt_give_transformers_tokens(llm, reference):
    outputs = llm.generate([prompt(text, *images) for text, images in CASES], GREEDY)
    assert tokens(outputs) == [reference(text, images) for text, images in CASES]


def test_the_first_tokens_logprobs_are_transformers(llm, hf):
    """WIDE and TALL are as many tokens in transposed grids: their positions, windows and logprobs differ, each
    transformers'."""
    model, processor = hf
    firsts = []
    for image in (WIDE, TALL):
        inputs = processor(text=ONE, images=[image], return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            expected = model(**inputs).logits[0, -1].log_softmax(-1)
        out = llm.generate(prompt(ONE, image), SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]
        for token, logprob in out.outputs[0].logprobs[0].top:
            assert abs(logprob - float(expected[token])) < 1e-5, token
        firsts.append(out.outputs[0].logprobs[0].top)
    assert firsts[0] != firsts[1]


@pytest.mark.parametrize("budget", [5, 12])
def test_a_chunked_prefill_whose_chunks_end_inside_pictures_gives_the_same_tokens(qwen, reference, budget):
    chunked = LLM(str(qwen), max_num_seqs=2, num_kv_blocks=128, block_size=4, max_num_batched_tokens=budget,
                  enable_prefix_caching=False)  # fmt: skip
    assert tokens(chunked.generate([prompt(ONE, WIDE), prompt(TWO, BIG, TALL)], GREEDY)) == [
        reference(ONE, [WIDE]), reference(TWO, [BIG, TALL])
    ]  # fmt: skip


def test_the_same_picture_again_is_a_prefix_hit_inside_its_run(llm, hf, reference):
    """4-token blocks: the hit ends inside BIG's 36 tokens, the rest of them computed on from there."""
    ends_soon = f"user: {PICTURE}?"
    first = llm.generate(prompt(ends_soon, BIG), GREEDY)[0]
    again = llm.generate(prompt(ends_soon, BIG), GREEDY)[0]
    pad = hf[1].tokenizer.convert_tokens_to_ids("<|image_pad|>")
    at, length = first.prompt_token_ids.index(pad), first.prompt_token_ids.count(pad)
    assert at < again.metrics.num_cached_tokens < at + length
    assert tokens([first, again]) == [reference(ends_soon, [BIG])] * 2
