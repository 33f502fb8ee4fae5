"""Tiny random multimodal checkpoints written by the tests, each as transformers saves it beside the processor that
writes its prompts: LLaVA (a CLIP tower and its projector) and Idefics3 / SmolVLM (a SigLIP-style tower read per
tile, a pixel shuffle). Their text models are tiny_models.make_tiny_llama's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.tiny_models import _LLAMA_DEFAULTS, _randomize_and_save, make_tokenizer

IMAGE_TOKEN = "<image>"
# ChatML with list content (what a multimodal chat template iterates): an image part is the processor's placeholder
# (which it expands to the image's tokens), a text part its text.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_llava(
    directory: str | Path, seed: int = 0, text_settings: dict[str, Any] | None = None, **overrides: Any
) -> Path:
    """Save a random tiny LlavaForConditionalGeneration to `directory`: make_tiny_llama's text model (with `<image>`
    added to the tokenizer as id 320) beside a 3-layer CLIP tower on 28-pixel images of 14-pixel patches (4 image
    tokens each) whose second-to-last hidden state LLaVA's projector reads, its class row dropped; and the
    LlavaProcessor (CLIP's image processor, LLAVA_CHAT_TEMPLATE) that writes the prompts. `overrides` go to
    LlavaConfig (vision_feature_layer, vision_feature_select_strategy, ...), `text_settings` to the text model's
    LlamaConfig (max_position_embeddings, ...)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=14)  # fmt: skip
    text = LlamaConfig(**(_LLAMA_DEFAULTS | (text_settings or {})), vocab_size=len(tokenizer))
    settings = dict(image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                    vision_feature_select_strategy="default", projector_hidden_act="gelu")  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, **(settings | overrides))
    torch.manual_seed(seed)
    path = _randomize_and_save(Path(directory), LlavaForConditionalGeneration(config).eval(), tokenizer)
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)  # fmt: skip
    processor.save_pretrained(path)  # transformers 5 nests the image processor's settings in processor_config.json
    images.save_pretrained(path)  # and, as hub checkpoints ship them, in preprocessor_config.json too
    return path


# Idefics3's processor tokens, and the tile tags SmolVLM's tokenizers hold as added tokens (rows and columns up to 6)
IDEFICS3_TOKENS = ("<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>")
IDEFICS3_TAGS = ("<global-img>", *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))
# SmolVLM's chat template: each message's role, its parts (an image part is the processor's placeholder)
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def make_tiny_idefics3(directory: str | Path, seed: int = 0, smolvlm: bool = False, **overrides: Any) -> Path:
    """Save a random tiny Idefics3ForConditionalGeneration (SmolVLMForConditionalGeneration with `smolvlm`) to
    `directory`: make_tiny_llama's text model (with the processor's tokens and the tile tags added to the
    tokenizer) beside a 2-layer tower on 16-pixel tiles of 4-pixel patches, shuffled by 2 into 4 image tokens a
    tile; and its processor, which resizes an image's longest edge to 32 pixels and cuts it into tiles of 16 (an
    image up to 16 pixels is one tile, a larger one 2 x 2 or 1 x 2 tiles and the whole image after them). SmolVLM's
    own processor needs torchvision and num2words (for videos), which the tests lack: its checkpoint gets
    Idefics3Processor, which writes an image's prompt as SmolVLMProcessor does, beside SmolVLM's image processor.
    `overrides` go to the model's config (scale_factor, ...)."""
    from transformers import Idefics3Processor, LlamaConfig

    if smolvlm:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
        from transformers import SmolVLMImageProcessorPil as Images
        from transformers import SmolVLMVisionConfig as VisionConfig
    else:
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
        from transformers import Idefics3ImageProcessorPil as Images
        from transformers import Idefics3VisionConfig as VisionConfig

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(IDEFICS3_TOKENS)})
    tokenizer.add_tokens(list(IDEFICS3_TAGS))
    tokenizer.chat_template = IDEFICS3_CHAT_TEMPLATE
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=16, patch_size=4)  # fmt: skip
    text = LlamaConfig(**_LLAMA_DEFAULTS, vocab_size=len(tokenizer))
    settings = dict(image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), scale_factor=2)
    config = Config(vision_config=vision, text_config=text, **(settings | overrides))
    torch.manual_seed(seed)
    path = _randomize_and_save(Path(directory), Model(config).eval(), tokenizer)
    images = Images(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    tokens_per_tile = (16 // 4) ** 2 // config.scale_factor**2
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=tokens_per_tile,
                                  chat_template=IDEFICS3_CHAT_TEMPLATE)  # fmt: skip
    processor.save_pretrained(path)
    images.save_pretrained(path)
    return path
