"""Tiny random multimodal checkpoints written by the tests, each as transformers saves it beside the processor that
writes its prompts: LLaVA (a CLIP tower and its projector) and Idefics3 / SmolVLM (a SigLIP-style tower read per
tile, a pixel shuffle). Their text models are tiny_models.make_tiny_llama's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
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


def make_tiny_idefics3(
    directory: str | Path,
    seed: int = 0,
    smolvlm: bool = False,
    text_settings: dict[str, Any] | None = None,
    **overrides: Any,
) -> Path:
    """Save a random tiny Idefics3ForConditionalGeneration (SmolVLMForConditionalGeneration with `smolvlm`) to
    `directory`: make_tiny_llama's text model (with the processor's tokens and the tile tags added to the
    tokenizer) beside a 2-layer tower on 16-pixel tiles of 4-pixel patches, shuffled by 2 into 4 image tokens a
    tile; and its processor, which resizes an image's longest edge to 32 pixels and cuts it into tiles of 16 (an
    image up to 16 pixels is one tile, a larger one 2 x 2 or 1 x 2 tiles and the whole image after them). SmolVLM's
    own processor needs torchvision and num2words (for videos), which the tests lack: its checkpoint gets
    Idefics3Processor, which writes an image's prompt as SmolVLMProcessor does, beside SmolVLM's image processor.
    `overrides` go to the model's config (scale_factor, ...), `text_settings` to its LlamaConfig."""
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
    text = LlamaConfig(**(_LLAMA_DEFAULTS | {"vocab_size": len(tokenizer)} | (text_settings or {})))
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


# Gemma 3's image tokens, turn tags, and the newline runs its tokenizer holds as single tokens (which the processor's
# blank lines around an image join with the prompt's newlines)
GEMMA3_TOKENS = ("<start_of_image>", "<image_soft_token>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>")
GEMMA3_NEWLINES = ("\n\n", "\n\n\n", "\n\n\n\n")
# Gemma 3's chat template, in short: an image part is <start_of_image>, a text part its text trimmed
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' }}"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def make_tiny_gemma3_vision(
    directory: str | Path, seed: int = 0, text_settings: dict[str, Any] | None = None, **overrides: Any
) -> Path:
    """Save a random tiny Gemma3ForConditionalGeneration with its vision tower to `directory`: a 3-layer Gemma 3
    text model (two layers sliding over 8 positions), a 2-layer SigLIP tower on 32-pixel images of 4-pixel patches
    whose 8 x 8 patches pool into 16 soft tokens (so an image's run is longer than the window), and the
    Gemma3Processor (Gemma3ImageProcessor, GEMMA3_CHAT_TEMPLATE) that writes its prompts. `overrides` go to the
    image processor (do_pan_and_scan, ...), `text_settings` to the text model's Gemma3TextConfig."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(GEMMA3_TOKENS)})
    tokenizer.add_tokens(list(GEMMA3_NEWLINES))
    tokenizer._set_model_specific_special_tokens(dict(zip(("boi_token", "image_token", "eoi_token"), GEMMA3_TOKENS)))
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    ids = dict(zip(("boi_token_index", "image_token_index", "eoi_token_index"),
                   tokenizer.convert_tokens_to_ids(list(GEMMA3_TOKENS[:3]))))  # fmt: skip
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}  # fmt: skip
    text = Gemma3TextConfig(**(_LLAMA_DEFAULTS | dict(
        vocab_size=len(tokenizer), head_dim=16, query_pre_attn_scalar=16, sliding_window=8, num_hidden_layers=3,
        sliding_window_pattern=3, rope_parameters=rope, tie_word_embeddings=True) | (text_settings or {})))  # fmt: skip
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=4, vision_use_head=False)  # fmt: skip
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=16, **ids)
    torch.manual_seed(seed)
    path = _randomize_and_save(Path(directory), Gemma3ForConditionalGeneration(config).eval(), tokenizer)
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, **overrides)
    processor = Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=16,
                                chat_template=GEMMA3_CHAT_TEMPLATE)  # fmt: skip
    processor.save_pretrained(path)
    images.save_pretrained(path)
    return path


def write_tiny_mmproj(path: str | Path, hf_dir: str | Path) -> Path:
    """Write the vision tower and projector of the Gemma 3 checkpoint in `hf_dir` as llama.cpp's
    `convert_hf_to_gguf.py --mmproj --outtype f32` writes them (its Gemma3VisionModel): general.type "mmproj", the
    `clip.vision.*` sizes, the preprocessor's mean and std, projector "gemma3" with its pooling as
    `projector.scale_factor`, gguf-py's `v.*` / `mm.*` names, the soft-token norm stored +1 and the input projection
    in F16 (as the converter forces it). Checked once against that converter's own file for make_tiny_gemma3_vision
    (the same keys, values, names, types and shapes)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path, hf_dir = Path(path), Path(hf_dir)
    config = AutoConfig.from_pretrained(hf_dir)
    vision, images = config.vision_config, json.loads((hf_dir / "preprocessor_config.json").read_text())
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(hf_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(config.text_config.hidden_size)
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_block_count(vision.num_hidden_layers)
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_image_mean(images["image_mean"])
    writer.add_vision_image_std(images["image_std"])
    writer.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_use_gelu(True)
    scale = (vision.image_size // vision.patch_size) // int(config.mm_tokens_per_image**0.5)
    if scale != 4:  # the converter writes it only where it is not llama.cpp's default
        writer.add_vision_projector_scale_factor(scale)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision.num_hidden_layers)
    for name, tensor in load_file(hf_dir / "model.safetensors").items():
        if not name.startswith(("vision_tower.", "multi_modal_projector.")):
            continue
        name = name.replace("vision_tower.", "vision_tower.vision_model.").replace("_weight", ".weight")
        values = tensor.float().numpy()
        if "soft_emb_norm" in name:
            values = values + 1
        base, _, kind = name.rpartition(".")
        gguf_name = f"{names.get_name(base)}.{kind}"
        kind = gguf.GGMLQuantizationType.F16 if "input_projection" in name else gguf.GGMLQuantizationType.F32
        writer.add_tensor(gguf_name, values.astype(np.float16 if kind == gguf.GGMLQuantizationType.F16 else np.float32),
                          raw_dtype=kind)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Gemma 4's image and audio tokens (boi, image, eoi, boa, audio, eoa) as its tokenizers spell them, and the video
# token Gemma4Processor adds to a tokenizer that lacks it
GEMMA4_TOKENS = ("<|image>", "<|image|>", "<image|>", "<|audio>", "<|audio|>", "<audio|>", "<|video|>")
GEMMA4_TOKEN_NAMES = ("boi_token", "image_token", "eoi_token", "boa_token", "audio_token", "eoa_token")


def make_tiny_gemma4_vision(
    directory: str | Path, seed: int = 0, text_settings: dict[str, Any] | None = None, **overrides: Any
) -> Path:
    """Save a random tiny Gemma4ForConditionalGeneration with its vision tower to `directory`: make_tiny_gemma4's
    text model (per-layer embeddings, shared KV, two of every three layers sliding over 8 positions; its pictures
    attend causally, use_bidirectional_attention null as E2B's), a 2-layer tower of 32 (2 heads of 16) on 4-pixel
    patches pooled 2 x 2, and its Gemma4ImageProcessorPil at max_soft_tokens 70 (the least it takes: an image is
    resized to at most 280 patches, 70 soft tokens). Gemma4Processor needs torchvision for its video processor,
    which the tests lack: a test builds it from the saved tokenizer and image processor (`gemma4_processor`).
    `overrides` go to the vision config (use_clipped_linears, standardize, ...), `text_settings` to the text model's
    Gemma4TextConfig (use_bidirectional_attention "vision": its sliding layers' pictures attend both ways)."""
    from transformers import (
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4ImageProcessorPil,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(GEMMA4_TOKENS)})
    tokenizer._set_model_specific_special_tokens(dict(zip(GEMMA4_TOKEN_NAMES, GEMMA4_TOKENS)))
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)  # the text model's pad_token_id (the processor pads)
    tokenizer.chat_template = image_chat_template("<|image|>")  # Gemma 4's image token, which its processor expands
    ids = tokenizer.convert_tokens_to_ids(list(GEMMA4_TOKENS))
    rope = {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}  # fmt: skip
    text = Gemma4TextConfig(**(_LLAMA_DEFAULTS | dict(
        vocab_size=len(tokenizer), head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, sliding_window=8, num_hidden_layers=6, max_position_embeddings=1024,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=len(tokenizer), num_kv_shared_layers=2, use_double_wide_mlp=True,
        final_logit_softcapping=30.0, rope_parameters=rope, initializer_range=0.1,
        tie_word_embeddings=True) | (text_settings or {})))  # fmt: skip
    vision = Gemma4VisionConfig(**(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, head_dim=16, patch_size=4,
                                        pooling_kernel_size=2, position_embedding_size=160,
                                        initializer_range=0.1) | overrides))  # fmt: skip
    config = Gemma4Config(text_config=text.to_dict(), vision_config=vision.to_dict(), audio_config=None,
                          boi_token_id=ids[0], image_token_id=ids[1], eoi_token_id=ids[2], boa_token_id=ids[3],
                          audio_token_id=ids[4], eoa_token_index=ids[5], video_token_id=ids[6])  # fmt: skip
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.layer_scalar.uniform_(0.5, 1.5)
        if vision.standardize:
            model.model.vision_tower.std_bias.normal_(0.0, 0.1)
            model.model.vision_tower.std_scale.uniform_(0.5, 1.5)
        if vision.use_clipped_linears:  # bounds that bite: each linear's input and output clamped to +-0.5
            for module in model.model.vision_tower.modules():
                if hasattr(module, "input_min"):
                    module.input_min.fill_(-0.5), module.input_max.fill_(0.5)
                    module.output_min.fill_(-0.5), module.output_max.fill_(0.5)
    path = _randomize_and_save(Path(directory), model, tokenizer)
    Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70).save_pretrained(path)
    return path


def gemma4_processor(path: str | Path) -> Any:
    """The Gemma4Processor of a make_tiny_gemma4_vision checkpoint: its tokenizer and image processor, without the
    audio feature extractor and the video processor (torchvision's), which the tests do not read."""
    from transformers import AutoTokenizer, Gemma4ImageProcessorPil, Gemma4Processor

    class ImagesOnly(Gemma4Processor):
        def check_argument_for_proper_class(self, name: str, argument: Any) -> Any:
            return None if argument is None else super().check_argument_for_proper_class(name, argument)

    tokenizer = AutoTokenizer.from_pretrained(path)
    return ImagesOnly(feature_extractor=None, image_processor=Gemma4ImageProcessorPil.from_pretrained(path),
                      tokenizer=tokenizer, video_processor=None, chat_template=tokenizer.chat_template)  # fmt: skip


# Qwen3.5's vision tokens as its tokenizer spells them: a picture's run of <|image_pad|> between <|vision_start|> and
# <|vision_end|> (the chat template writes one <|image_pad|> an image, the processor repeats it per merged patch)
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def image_chat_template(image: str) -> str:
    """ChatML with list content, each image part written as `image` (the placeholder a family's template writes)."""
    return (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


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
