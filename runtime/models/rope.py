"""The rotary-embedding tables: cos and sin of every position, computed once per model at lowering time.

Matches Hugging Face's rotary embedding for the `default`, `linear`, `dynamic`, `llama3`, `yarn`, `longrope` and
`proportional` (Gemma 4: a whole head's table whose last frequencies are 0) rope types and partial rotary (only a
head's first `rotary_dims` turn), so our logits match transformers' to float tolerance. YaRN and LongRoPE also scale
attention (their `attention_factor`): folded into the table, as Hugging Face multiplies its cos and sin, so every
kernel that reads the table applies it.

Two types depend on the sequence length in transformers, which recomputes the table for a whole batch once a
sequence outgrows it. A server cannot re-rotate keys it has cached, so the length here is the engine's
`max_positions`, fixed for its life (as llama.cpp fixes it by its context size): `dynamic` equals `default` up to
max_position_embeddings (where transformers agrees exactly) and uses the NTK base of `max_positions` beyond;
`longrope` takes its long factors when `max_positions` exceeds the original context, else its short ones."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.config import ModelConfig

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "proportional")


def rope_type(config: ModelConfig) -> str:
    scaling = config.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def inverse_frequencies(config: ModelConfig, max_positions: int | None = None) -> torch.Tensor:
    """[rotary_dims / 2]; `max_positions` (default max_position_embeddings) is the longest sequence served."""
    d, base = config.rotary_dims, config.rope_theta
    max_positions = max_positions or config.max_position_embeddings
    scaling, kind = config.rope_scaling or {}, rope_type(config)
    if kind == "dynamic" and max_positions > config.max_position_embeddings:
        factor, length = scaling["factor"], max_positions / config.max_position_embeddings
        base = base * (factor * length - (factor - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # [R/2]
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq = _yarn_scaled(config, scaling)
    elif kind == "longrope":
        long = max_positions > _original_context(config, scaling)
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise InvalidInput(f"longrope factors have {factors.numel()} values, expected {inv_freq.numel()}")
        inv_freq = 1.0 / (factors * base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    elif kind == "proportional":  # Gemma 4: the first `partial_rotary_factor` of the frequencies, the rest 0
        turned = int(scaling.get("partial_rotary_factor", 1.0) * d // 2)
        inv_freq = torch.cat([inv_freq[:turned], torch.zeros(d // 2 - turned)]) / scaling.get("factor", 1.0)
    elif kind not in ROPE_TYPES:
        raise InvalidInput(f"rope_scaling type {kind!r} is not supported (have {', '.join(ROPE_TYPES)})")
    return inv_freq


def attention_factor(config: ModelConfig) -> float:
    """How much the rope type scales cos and sin: 1, but for YaRN and LongRoPE the `attention_factor` given, else
    what each derives from its factor."""
    scaling, kind = config.rope_scaling or {}, rope_type(config)
    if kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if kind == "longrope":
        original = _original_context(config, scaling)
        factor = scaling.get("factor") or config.max_position_embeddings / original
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    factor = _yarn_factor(config, scaling)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
    return _mscale(factor)


def _yarn_scaled(config: ModelConfig, s: dict) -> torch.Tensor:
    """YaRN: dimensions that rotate fast keep their frequency, slow ones are interpolated by `factor`, and a linear
    ramp between the two correction dimensions (from beta_fast and beta_slow rotations) blends them."""
    d, base, factor = config.rotary_dims, config.rope_theta, _yarn_factor(config, s)
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


def _original_context(config: ModelConfig, s: dict) -> int:
    return s.get("original_max_position_embeddings") or config.max_position_embeddings


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
    """[max_positions, rotary_dims]: cos of each (position, frequency) in the first half, sin in the second."""
    inv_freq = inverse_frequencies(config, max_positions)  # [R/2]
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, R/2]
    table = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [P, R]
    scale = attention_factor(config)
    return (table * scale if scale != 1.0 else table).to(device)


def rope_tables(
    config: ModelConfig, max_positions: int, device: torch.device | str = "cpu", step_rows: int = 0
) -> dict[str, torch.Tensor]:
    """The tables a model's rope nodes name: "global", and "local" for sliding layers with their own rope (Gemma 3's
    sliding layers turn by theta 1e4, unscaled, its global ones by 1e6 with the model's scaling). `step_rows`: rows
    past the positions for a step's picture tokens to read (M-RoPE, mrope.StepRopeRows), written each step."""
    full = replace(config, head_dim=config.full_head_dim) if config.full_head_dim else config  # Gemma 4's head size
    table = cos_sin_table(full, max_positions, device)
    if step_rows:
        table = torch.cat([table, table.new_zeros(step_rows, table.shape[1])])
    tables = {"global": table}
    if config.local_rope_theta is not None:
        local = replace(config, rope_theta=config.local_rope_theta, rope_scaling=None)
        tables["local"] = cos_sin_table(local, max_positions, device)
    return tables
