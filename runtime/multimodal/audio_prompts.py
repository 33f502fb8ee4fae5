"""A prompt's audio clips made into what the engine runs (Qwen2-Audio's processor's work): each clip's log-mel
frames (audio_features.py, Whisper's), its one `<|AUDIO|>` placeholder repeated once per embedding the encoder gives
it, and a MediaFeature per clip.

What the feature carries for the encoder is the clip's own frames and the AUDIO_FRAMES_PAST_CLIP frames after them
(the padding's, or zeros past the window, as the convolution pads): the only frames past the clip the encoder's
rows for it read, so the clip is encoded alone, exactly as the processor's padded window would encode it, and its
hash covers what the encoder reads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.audio_config import AudioConfig
from sagellm.runtime.multimodal.audio_features import WhisperLogMelExtractor
from sagellm.runtime.multimodal.encoder_runner import AUDIO_FRAMES_PAST_CLIP
from sagellm.runtime.multimodal.media_feature import Expansion, MediaFeature, media_hash

FEATURE_EXTRACTORS = ("WhisperFeatureExtractor",)


class AudioPrompts:
    modality = "audio"

    def __init__(self, extractor: WhisperLogMelExtractor, audio: AudioConfig, max_items: int | None = None) -> None:
        """`max_items`: the most clips a prompt may carry (limit_mm_per_prompt's; None: no cap)."""
        if extractor.feature_size != audio.num_mel_bins or extractor.nb_max_frames > audio.max_frames:
            raise InvalidInput(f"the feature extractor's {extractor.feature_size} mel bins and "
                               f"{extractor.nb_max_frames} frames do not fit the audio tower's "
                               f"{audio.num_mel_bins} and {audio.max_frames}")  # fmt: skip
        self.extractor = extractor
        self.audio = audio
        self.placeholder_id = self.token_id = audio.audio_token_id  # a clip's placeholder is its run's token
        self.max_items = max_items

    @classmethod
    def from_settings(cls, preprocessor: Mapping | None, processor_file: Mapping, audio: AudioConfig,
                      max_items: int | None = None) -> AudioPrompts:  # fmt: skip
        """From a checkpoint's preprocessor_config.json, or processor_config.json's "feature_extractor"."""
        settings = preprocessor or processor_file.get("feature_extractor")
        if not settings:
            raise InvalidInput("no preprocessor_config.json (nor processor_config.json's feature_extractor): the "
                               "model's audio cannot be preprocessed")  # fmt: skip
        kind = settings.get("feature_extractor_type", "WhisperFeatureExtractor")
        if kind not in FEATURE_EXTRACTORS:
            raise InvalidInput(f"feature_extractor_type {kind!r} is not one we run (we take {FEATURE_EXTRACTORS})")
        return cls(WhisperLogMelExtractor.from_config(settings), audio, max_items)

    def expansions(self, clips: Sequence[Any]) -> list[Expansion]:
        """Each clip's placeholder tokens and its feature; a clip is (samples, sample_rate), vLLM's form."""
        out = []
        for clip in clips:
            samples, rate = _clip(clip)
            mel = self.extractor.extract(samples, rate)
            kept = torch.zeros(1, mel.features.shape[0], mel.valid_frames + AUDIO_FRAMES_PAST_CLIP)
            frames = min(kept.shape[-1], mel.features.shape[-1])
            kept[0, :, :frames] = mel.features[:, :frames]
            tokens = self.audio.tokens_for_frames(mel.valid_frames)
            if tokens < 1:
                raise InvalidInput(f"the audio clip is too short ({mel.valid_frames} frames of 10 ms): the model "
                                   "hears at least 40 ms")  # fmt: skip
            feature = MediaFeature("audio", media_hash(kept), 0, tokens, kept)
            out.append(Expansion([self.placeholder_id] * tokens, [feature]))
        return out

    def check_feature(self, feature: MediaFeature) -> None:
        """Any length is a clip's: an encoded clip needs no check beyond its embeddings' rows."""


def _clip(item: Any) -> tuple[np.ndarray, int]:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], int)):
        raise InvalidInput("an audio clip is given as (samples, sample_rate): a float array and its rate in Hz")
    samples = np.asarray(item[0])
    if samples.ndim == 2:  # (frames, channels), as soundfile reads it: the channels averaged, as WAV decoding does
        samples = samples.mean(axis=1)
    return samples.astype(np.float32, copy=False) if np.issubdtype(samples.dtype, np.floating) else samples, item[1]
