"""The audio encoder of a multimodal config.json as an AudioConfig: Qwen2-Audio's (a Whisper-style tower, its
rows averaged in pairs, one linear into the text model). Hub configs leave out the keys transformers defaults, so
Qwen2AudioEncoderConfig's defaults fill them; a setting the graph does not implement is refused naming its key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sagellm.runtime.models.audio_config import AudioConfig
from sagellm.runtime.models.loaded import ModelLoadError

# transformers' Qwen2AudioEncoderConfig defaults (Whisper large's encoder), for the keys `audio_config` leaves out
_QWEN2_AUDIO_DEFAULTS = {"num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20,
                         "encoder_ffn_dim": 5120, "d_model": 1280, "activation_function": "gelu",
                         "max_source_positions": 1500, "scale_embedding": False}  # fmt: skip
QWEN2_AUDIO = "Qwen2AudioForConditionalGeneration"


def audio_from_hf(
    hf_config: Mapping[str, Any], text_hidden_size: int, source: Path = Path("config.json")
) -> AudioConfig | None:
    """The audio encoder of a Qwen2-Audio config.json, None for a checkpoint that hears nothing (every other
    class: Gemma 3n's and Gemma 4's audio towers are not run). `text_hidden_size`: its text model's width."""
    if QWEN2_AUDIO not in (hf_config.get("architectures") or []):
        return None
    tower = _QWEN2_AUDIO_DEFAULTS | {k: v for k, v in (hf_config.get("audio_config") or {}).items() if v is not None}
    if tower["activation_function"] != "gelu":
        raise ModelLoadError(f"{source}: audio_config.activation_function {tower['activation_function']!r} is not "
                             "supported (have gelu)")  # fmt: skip
    if tower["scale_embedding"]:
        raise ModelLoadError(f"{source}: audio_config.scale_embedding true is not supported")
    hidden, heads = int(tower["d_model"]), int(tower["encoder_attention_heads"])
    if hidden % heads:
        raise ModelLoadError(f"{source}: audio_config.d_model {hidden} is not a multiple of its {heads} heads")
    return AudioConfig(
        hidden_size=hidden,
        intermediate_size=int(tower["encoder_ffn_dim"]),
        num_layers=int(tower["encoder_layers"]),
        num_heads=heads,
        num_mel_bins=int(tower["num_mel_bins"]),
        max_source_positions=int(tower["max_source_positions"]),
        activation="gelu",
        layer_norm_eps=1e-5,  # nn.LayerNorm's default, which the tower's norms keep
        text_hidden_size=text_hidden_size,
        audio_token_id=int(hf_config.get("audio_token_index", hf_config.get("audio_token_id", 151646))),
    )
