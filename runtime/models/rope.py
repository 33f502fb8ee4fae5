"""The rotary-embedding table: cos and sin of every position, computed once per model at lowering time.

Matches Hugging Face's rotary embedding for the `default`, `linear`, `llama3` and `yarn` rope types, so our logits
match transformers' to float tolerance. YaRN also scales attention (its `attention_factor`): folded into the table,
as Hugging Face multiplies its cos and sin, so every kernel that reads the table applies it."""

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
    elif kind == "yarn":
        inv_freq = _yarn_scaled(config, scaling)
    elif kind != "default":
        raise InvalidInput(f"rope_scaling type {kind!r} is not supported (have default, linear, llama3, yarn)")
    return inv_freq


def attention_factor(config: ModelConfig) -> float:
    """How much the rope type scales cos and sin (1 but for YaRN: the `attention_factor` given, else its mscale)."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(config, scaling)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
    return _mscale(factor)


def _yarn_scaled(config: ModelConfig, s: dict) -> torch.Tensor:
    """YaRN: dimensions that rotate fast keep their frequency, slow ones are interpolated by `factor`, and a linear
    ramp between the two correction dimensions (from beta_fast and beta_slow rotations) blends them."""
    d, base, factor = config.head_dim, config.rope_theta, _yarn_factor(config, s)
    old_context = s.get("original_max_position_embeddings") or config.max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return d * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high = high + 0.001 if low == high else high
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolated = 1 - ramp  # the share of each dimension's own frequency
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolated) + (1.0 / pos_freqs) * extrapolated


def _yarn_factor(config: ModelConfig, s: dict) -> float:
    old_context = s.get("original_max_position_embeddings") or config.max_position_embeddings
    return s.get("factor") or config.max_position_embeddings / old_context


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


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
    table = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [P, D]
    scale = attention_factor(config)
    return (table * scale if scale != 1.0 else table).to(device)
