"""A tiny random Qwen2-Audio checkpoint written by the tests, as transformers saves it beside the processor that
writes its prompts: a Whisper-style audio tower and its projector beside tiny_models.make_tiny_llama's text model
sizes (as Qwen2, which the checkpoint's text model is)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.tiny_models import _LLAMA_DEFAULTS, _randomize_and_save, make_tokenizer

AUDIO_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
# Qwen2-Audio-7B-Instruct's chat template: an audio part (one with an "audio" or "audio_url" key) is numbered and its
# placeholder put between the clip's tags, on a line of its own
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_qwen2_audio(
    directory: str | Path, seed: int = 0, text_settings: dict[str, Any] | None = None, **overrides: Any
) -> Path:
    """Save a random tiny Qwen2AudioForConditionalGeneration to `directory`: a 2-layer audio tower of width 32 on
    128 mel bins (Qwen2-Audio's), its projector, a 2-layer Qwen2 text model (make_tiny_llama's sizes, its tokenizer
    with the audio tokens added), and Qwen2AudioProcessor (Whisper's feature extractor, the chat template above).
    `overrides` go to Qwen2AudioConfig, `text_settings` to the text model's Qwen2Config."""
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(AUDIO_TOKENS)})
    tokenizer.chat_template = QWEN2_AUDIO_CHAT_TEMPLATE
    audio = Qwen2AudioEncoderConfig(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4,
                                    encoder_ffn_dim=64, d_model=32)  # fmt: skip
    text = Qwen2Config(**(_LLAMA_DEFAULTS | (text_settings or {})), vocab_size=len(tokenizer))
    settings = dict(audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKENS[0]))
    config = Qwen2AudioConfig(audio_config=audio, text_config=text, **(settings | overrides))
    torch.manual_seed(seed)
    path = _randomize_and_save(Path(directory), Qwen2AudioForConditionalGeneration(config).eval(), tokenizer)
    features = WhisperFeatureExtractor(feature_size=128)
    processor = Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer,
                                    chat_template=QWEN2_AUDIO_CHAT_TEMPLATE)  # fmt: skip
    processor.save_pretrained(path)
    features.save_pretrained(path)  # as hub checkpoints ship it: preprocessor_config.json
    return path
