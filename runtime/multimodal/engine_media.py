"""What an engine needs to take images and audio, made once when it is built: the prompts' side (PromptMedia:
preprocessing, placeholders, features) and the model's side (its vision and audio encoders behind one cache). None
for a model that takes neither. In a parallel engine they live on rank 0 alone, whose step hands the embeddings to
the first stage's ranks (`parallel/take_part.py`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sagellm.backends.base import HardwareBackend
from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.loaded import ProcessorFiles
from sagellm.runtime.multimodal.encoder_cache import EncoderCache
from sagellm.runtime.multimodal.encoder_runner import AudioEncoderRunner, Encoder, EncoderRunner
from sagellm.runtime.multimodal.prompt_media import PromptMedia

PICTURES_CACHED, CLIPS_CACHED = 64, 16  # the encoder cache's size: the rows of so many pictures, or of 30-s clips
# ... but no more rows than this many bytes of float32 embeddings hold (a Qwen-VL picture may be 16,384 tokens of
# 4,096 numbers), nor fewer than the largest picture or clip
CACHED_BYTES = 2**30


@dataclass
class EngineMedia:
    prompts: PromptMedia
    encoder: EncoderCache


def engine_media(
    config: ModelConfig,
    weights: Mapping[str, torch.Tensor],
    files: ProcessorFiles | None,
    tokenizer: Any,
    backend: HardwareBackend,
    linear_dtype: torch.dtype,
    limits: Mapping[str, int] | None = None,
) -> EngineMedia | None:
    """`files`: the model's processor settings (LoadedModel.processor_files); `tokenizer`: the model's (a Hugging
    Face tokenizer), which tokenizes what a placeholder becomes; `limits`: the most items of each modality a prompt
    may carry (limit_mm_per_prompt; none: no cap)."""
    if not config.takes_media:
        return None
    if files is None:
        raise InvalidInput("images and audio need the checkpoint's preprocessing settings (a Hugging Face "
                           "directory's preprocessor_config.json, or a GGUF model's mmproj file)")  # fmt: skip
    prompts = PromptMedia.of_model(config, files, tokenizer, limits)
    return EngineMedia(prompts, EncoderCache(encoders(config, weights, backend, linear_dtype), cached_rows(config)))


def cached_rows(config: ModelConfig) -> int:
    """The encoder cache's size in embeddings: PICTURES_CACHED pictures' or CLIPS_CACHED clips' at the most each
    gives, within CACHED_BYTES, and at least the largest one's."""
    picture = config.vision.tokens_per_image if config.vision is not None else 0
    clip = config.audio.tokens_for_frames(config.audio.max_frames) if config.audio is not None else 0
    width = config.vision.embedding_width if config.vision is not None else config.hidden_size  # Qwen3-VL's wider
    rows = min(max(PICTURES_CACHED * picture, CLIPS_CACHED * clip), CACHED_BYTES // (4 * width))
    return max(picture, clip, rows)


def encoders(
    config: ModelConfig, weights: Mapping[str, torch.Tensor], backend: HardwareBackend, linear_dtype: torch.dtype
) -> dict[str, Encoder]:
    """The model's encoders, by the modality each reads."""
    out: dict[str, Encoder] = {}
    if config.vision is not None:
        out["image"] = EncoderRunner(config, weights, backend, linear_dtype=linear_dtype)
    if config.audio is not None:
        out["audio"] = AudioEncoderRunner(config, weights, backend, linear_dtype=linear_dtype)
    return out
