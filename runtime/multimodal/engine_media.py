"""What an engine needs to take images, made once when it is built: the prompts' side (PromptMedia: preprocessing,
placeholders, features) and the model's side (the vision encoder behind its cache). None for a model that sees
none, and refused where it does not run yet (a checkpoint without its preprocessor's settings, a GGUF without its
mmproj, tensor or pipeline parallel ranks)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sagellm.backends.base import HardwareBackend
from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.multimodal.encoder_cache import EncoderCache
from sagellm.runtime.multimodal.encoder_runner import EncoderRunner
from sagellm.runtime.multimodal.prompt_media import PromptMedia

IMAGES_CACHED = 64  # the encoder cache's size, in pictures' worth of rows


@dataclass
class EngineMedia:
    prompts: PromptMedia
    encoder: EncoderCache


def engine_media(
    config: ModelConfig,
    weights: Mapping[str, torch.Tensor],
    source: Path,
    tokenizer: Any,
    backend: HardwareBackend,
    linear_dtype: torch.dtype,
    world_size: int,
    max_images: int | None = None,
) -> EngineMedia | None:
    """`tokenizer`: the model's (a Hugging Face tokenizer), which tokenizes what a placeholder becomes;
    `max_images`: the most a prompt may carry (None: no cap)."""
    vision = config.vision
    if vision is None:
        return None
    if world_size > 1:
        raise InvalidInput("a model that sees images runs on one rank for now: tensor_parallel_size and "
                           "pipeline_parallel_size 1")  # fmt: skip
    if not source.is_dir():
        raise InvalidInput(f"{source}: images need the checkpoint's directory (its preprocessor's settings)")
    prompts = PromptMedia.of_model(vision, source, tokenizer, max_images)
    encoder = EncoderRunner(config, weights, backend, linear_dtype=linear_dtype)
    return EngineMedia(prompts, EncoderCache(encoder, IMAGES_CACHED * vision.tokens_per_image))
