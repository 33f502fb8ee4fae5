"""Tiny random Qwen-VL checkpoints written by the tests, each as transformers saves it beside its tokenizer and image
processor: Qwen3.5 (its vision tower beside the DeltaNet text model), Qwen2.5-VL (window attention) and Qwen3-VL
(DeepStack), each with the multimodal rotary positions its hub config gives. Their processors need torchvision for
videos, which the tests lack: each `*_processor` builds one from the saved tokenizer and image processor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.tiny_models import _LLAMA_DEFAULTS, _randomize_and_save, make_tokenizer
from tests.tiny_vision_models import image_chat_template

# Qwen3.5's vision tokens as its tokenizer spells them: a picture's run of <|image_pad|> between <|vision_start|> and
# <|vision_end|> (the chat template writes one <|image_pad|> an image, the processor repeats it per merged patch)
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


QWEN3_5_CHAT_TEMPLATE = image_chat_template("<|vision_start|><|image_pad|><|vision_end|>")  # as Qwen3.5's writes it
# Its image processor's settings at a tiny scale: 16-pixel patches merged 2 x 2, a picture resized to 32 x 32 to
# 128 x 128 pixels (1 to 16 image tokens), mean and std 0.5 as Qwen3.5's preprocessor_config.json
QWEN3_5_IMAGES = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                      size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128})  # fmt: skip


def make_tiny_qwen3_5_vision(
    directory: str | Path, seed: int = 0, text_settings: dict[str, Any] | None = None, **overrides: Any
) -> Path:
    """Save a random tiny Qwen3_5ForConditionalGeneration to `directory`: make_tiny_qwen3_5's text model (DeltaNet
    and gated attention layers, heads of 16) with multimodal rotary positions as the hub's config gives them (half
    of each head rotated, mrope_section [2, 1, 1] over its 4 frequencies, interleaved), a 2-layer tower of 32 (4
    heads) on 16-pixel patches of 2 frames, its learned positions a 5 x 5 grid interpolated to each picture's, its
    merger joining 2 x 2 patches into one token of the text width; its tokenizer (with Qwen's vision tokens and
    QWEN3_5_CHAT_TEMPLATE) and its Qwen2VLImageProcessorPil (QWEN3_5_IMAGES) saved beside it. Qwen3VLProcessor, which
    AutoProcessor picks, needs torchvision for its video processor, which the tests lack: `qwen3_5_processor` builds
    it from the saved tokenizer and image processor. `text_settings` go to the text config, `overrides` to the
    vision config."""
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5TextConfig,
        Qwen3_5VisionConfig,
    )

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_VISION_TOKENS)})
    tokenizer.chat_template = QWEN3_5_CHAT_TEMPLATE
    start, end, image, video = tokenizer.convert_tokens_to_ids(list(QWEN_VISION_TOKENS))
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True}  # fmt: skip
    text = Qwen3_5TextConfig(**(_LLAMA_DEFAULTS | dict(
        vocab_size=len(tokenizer), head_dim=16, num_hidden_layers=4, full_attention_interval=2,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        rope_parameters=rope, initializer_range=0.1) | (text_settings or {})))  # fmt: skip
    vision = Qwen3_5VisionConfig(**(dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=64, patch_size=16,
                                         spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=25,
                                         out_hidden_size=text.hidden_size, initializer_range=0.1)
                                    | overrides))  # fmt: skip
    config = Qwen3_5Config(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=image,
                           video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
                           tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    path = _randomize_and_save(Path(directory), Qwen3_5ForConditionalGeneration(config).eval(), tokenizer)
    Qwen2VLImageProcessorPil(**QWEN3_5_IMAGES).save_pretrained(path)
    return path


def qwen3_5_processor(path: str | Path) -> Any:
    """The Qwen3VLProcessor of a make_tiny_qwen3_5_vision checkpoint (what AutoProcessor gives Qwen3.5): its tokenizer
    and image processor, without the video processor (torchvision's), which the tests do not read."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLProcessor

    class ImagesOnly(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, name: str, argument: Any) -> Any:
            return None if argument is None else super().check_argument_for_proper_class(name, argument)

    tokenizer = AutoTokenizer.from_pretrained(path)
    return ImagesOnly(image_processor=Qwen2VLImageProcessorPil.from_pretrained(path), tokenizer=tokenizer,
                      video_processor=None, chat_template=tokenizer.chat_template)  # fmt: skip


# Qwen2.5-VL's image processor at a tiny scale, spelled as its hub preprocessor_config.json spells it (min_pixels and
# max_pixels, not size): 14-pixel patches merged 2 x 2 (28-pixel squares), a picture resized to 1 to 36 squares, CLIP's
# mean and std (Qwen2VLImageProcessor's defaults)
QWEN2_5_VL_IMAGES = {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 36, "patch_size": 14, "temporal_patch_size": 2,
                     "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                     "processor_class": "Qwen2_5_VLProcessor"}  # fmt: skip


def make_tiny_qwen2_5_vl(
    directory: str | Path, seed: int = 0, text_settings: dict[str, Any] | None = None, **overrides: Any
) -> Path:
    """Save a random tiny Qwen2_5_VLForConditionalGeneration to `directory`: a Qwen2 text model (q/k/v biases, heads of
    16) with multimodal rotary positions as the hub's config gives them (mrope_section [2, 3, 3] over its 8
    frequencies, not interleaved); a 3-layer tower of 32 (4 heads, a SwiGLU MLP, RMSNorms) on 14-pixel patches of 2
    frames, attending within windows of 56 pixels (2 x 2 merged squares) but in layer 1, which attends over the whole
    picture, its merger joining 2 x 2 patches into one token of the text width; its tokenizer (Qwen's vision tokens,
    QWEN3_5_CHAT_TEMPLATE, which writes a picture as Qwen2.5-VL's does) and QWEN2_5_VL_IMAGES beside it.
    Qwen2_5_VLProcessor, which AutoProcessor picks, needs torchvision for its video processor: `qwen2_5_vl_processor`
    builds it from the saved tokenizer and image processor. `text_settings` go to the text config, `overrides` to the
    vision config."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_VISION_TOKENS)})
    tokenizer.chat_template = QWEN3_5_CHAT_TEMPLATE
    start, end, image, video = tokenizer.convert_tokens_to_ids(list(QWEN_VISION_TOKENS))
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
    text = Qwen2_5_VLTextConfig(**(_LLAMA_DEFAULTS | dict(vocab_size=len(tokenizer), rope_parameters=rope,
                                                          initializer_range=0.1) | (text_settings or {})))  # fmt: skip
    vision = Qwen2_5_VLVisionConfig(**(dict(depth=3, hidden_size=32, num_heads=4, intermediate_size=48, patch_size=14,
                                            spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                                            fullatt_block_indexes=[1], out_hidden_size=text.hidden_size,
                                            hidden_act="silu", initializer_range=0.1)
                                       | overrides))  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=image,
                              video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
                              tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # the merger's RMSNorm (ln_q) is no "norm" by name: made distinct here
        model.model.visual.merger.ln_q.weight.copy_(1 + 0.1 * torch.randn(vision.hidden_size))
    path = _randomize_and_save(Path(directory), model, tokenizer)
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN2_5_VL_IMAGES, indent=2))
    return path


def qwen2_5_vl_processor(path: str | Path) -> Any:
    """The Qwen2_5_VLProcessor of a make_tiny_qwen2_5_vl checkpoint: its tokenizer and image processor, without the
    video processor (torchvision's), which the tests do not read."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    class ImagesOnly(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name: str, argument: Any) -> Any:
            return None if argument is None else super().check_argument_for_proper_class(name, argument)

    tokenizer = AutoTokenizer.from_pretrained(path)
    return ImagesOnly(image_processor=Qwen2VLImageProcessorPil.from_pretrained(path), tokenizer=tokenizer,
                      video_processor=None, chat_template=tokenizer.chat_template)  # fmt: skip


def make_tiny_qwen3_vl(
    directory: str | Path, seed: int = 0, text_settings: dict[str, Any] | None = None, **overrides: Any
) -> Path:
    """Save a random tiny Qwen3VLForConditionalGeneration to `directory`: a 4-layer Qwen3 text model (q/k RMSNorms,
    heads of 16) with multimodal rotary positions as the hub's config gives them (mrope_section [4, 2, 2] over its 8
    frequencies, interleaved); make_tiny_qwen3_5_vision's tower (Qwen3-VL's is Qwen3.5's) at 3 layers, with
    DeepStack mergers on layers 0 and 1, whose rows join the text model's after its layers 0 and 1; its tokenizer
    (Qwen's vision tokens, QWEN3_5_CHAT_TEMPLATE) and QWEN3_5_IMAGES (Qwen3-VL's settings too) beside it.
    `qwen3_5_processor` builds its Qwen3VLProcessor. `text_settings` go to the text config, `overrides` to the vision
    config."""
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLTextConfig,
        Qwen3VLVisionConfig,
    )

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_VISION_TOKENS)})
    tokenizer.chat_template = QWEN3_5_CHAT_TEMPLATE
    start, end, image, video = tokenizer.convert_tokens_to_ids(list(QWEN_VISION_TOKENS))
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    text = Qwen3VLTextConfig(**(_LLAMA_DEFAULTS | dict(vocab_size=len(tokenizer), head_dim=16, num_hidden_layers=4,
                                                       rope_parameters=rope, initializer_range=0.1)
                                | (text_settings or {})))  # fmt: skip
    vision = Qwen3VLVisionConfig(**(dict(depth=3, hidden_size=32, num_heads=4, intermediate_size=64, patch_size=16,
                                         spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=25,
                                         deepstack_visual_indexes=[0, 1], out_hidden_size=text.hidden_size,
                                         initializer_range=0.1)
                                    | overrides))  # fmt: skip
    config = Qwen3VLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=image,
                           video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
                           tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    path = _randomize_and_save(Path(directory), Qwen3VLForConditionalGeneration(config).eval(), tokenizer)
    Qwen2VLImageProcessorPil(**QWEN3_5_IMAGES).save_pretrained(path)
    return path
