"""Tiny random multimodal checkpoints written by the tests, each as transformers saves it beside the processor that
writes its prompts: LLaVA (a CLIP tower and its projector), Idefics3 / SmolVLM (a SigLIP-style tower read per tile, a
pixel shuffle), Gemma 3 and Gemma 4; the Qwen-VL families' are tiny_qwen_vl_models'."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.tiny_models import _LLAMA_DEFAULTS, _randomize_and_save, make_tokenizer

IMAGE_TOKEN = "<image>"


def image_chat_template(image: str) -> str:
    """ChatML with list content (what a multimodal chat template iterates): each image part written as `image`, the
    processor's placeholder (which it expands to the image's tokens), a text part its text."""
    return (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


LLAVA_CHAT_TEMPLATE = image_chat_template(IMAGE_TOKEN)


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
