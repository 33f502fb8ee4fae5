"""The rotary-embedding table: cos and sin of every position, computed once per model at lowering time.

Matches Hugging Face's rotary embedding for the `default`, `linear` and `llama3` rope types, so our logits match
transformers' to float tolerance."""

from __future__ import annotations

import math

import torch

from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # [D/2]
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    elif kind != "default":
        raise InvalidInput(f"rope_scaling type {kind!r} is not supported (have default, linear, llama3)")
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_context = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin_table(config: ModelConfig, max_positions: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[max_positions, head_dim]: cos of each (position, frequency) in the first half, sin in the second."""
    inv_freq = inverse_frequencies(config)  # [D/2]
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, D/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)  # [P, D]
