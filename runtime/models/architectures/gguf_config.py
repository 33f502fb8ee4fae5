"""GGUF metadata translated into a ModelConfig, the same one a config.json of the model gives.

llama.cpp's converter keeps some settings under its own keys, some only as tensors (rope frequencies, LongRoPE
factors) and drops others (Gemma's attention scale): this module recovers what the original config held, so a GGUF
and its Hugging Face checkpoint build the same graph."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sagellm.runtime.models.architectures.families import Architecture, architecture_for_gguf, check_experts
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.loaded import ModelLoadError

# GGUF architectures llama.cpp writes for a family's text model under another name: Qwen2.5-VL's (and Qwen2-VL's) is
# Qwen2's layer, Qwen3-VL's Qwen3's, each rope turned by M-RoPE's sections (_MROPE_INTERLEAVED)
_GGUF_ALIASES = {"qwen2vl": "qwen2", "qwen3vl": "qwen3"}


def config_from_gguf(
    metadata: Mapping[str, Any],
    *,
    tied: bool,
    token_count: int | None,
    rope_freqs: np.ndarray | None,
    rope_factors: tuple[np.ndarray, np.ndarray] | None,
    source: Path,
) -> ModelConfig:
    """Translate GGUF metadata (scalar keys only); `tied` is whether the file lacks output.weight, `rope_freqs` the
    llama3-style per-frequency divisors and `rope_factors` LongRoPE's (long, short) factors, which llama.cpp stores as
    tensors instead of as metadata."""
    gguf_arch = metadata.get("general.architecture")
    experts = int(metadata.get(f"{gguf_arch}.expert_count", 0))
    per_token = int(metadata.get(f"{gguf_arch}.expert_used_count", 0))
    arch = architecture_for_gguf(_GGUF_ALIASES.get(gguf_arch, gguf_arch), experts > 0, source)
    check_experts(experts, per_token, f"{gguf_arch}.expert_count/expert_used_count", source)
    prefix = gguf_arch  # the file's own: an alias's keys are under its name

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{prefix}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{source}: GGUF metadata lacks {prefix}.{name}")
        return value

    hidden, heads, layers = int(key("embedding_length")), int(key("attention.head_count")), int(key("block_count"))
    layers -= int(metadata.get(f"{prefix}.nextn_predict_layers", 0))  # multi-token prediction blocks come last
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary_dim = int(key("rope.dimension_count", head_dim))
    theta = _from_float32(key("rope.freq_base", 10000.0))
    window, layer_types = _gguf_sliding_window(arch, metadata, prefix, layers)
    if arch.gated_delta_net:
        layer_types = _gguf_hybrid_layer_types(metadata, prefix, layers)
    kv_heads = _per_layer(key("attention.head_count_kv", heads), layers)
    widths = _per_layer(key("expert_feed_forward_length", key("feed_forward_length")), layers)
    eos_keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    config = ModelConfig(
        architecture=arch.name,
        vocab_size=int(key("vocab_size", token_count)),
        hidden_size=hidden,
        intermediate_size=widths[0],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads[0],
        head_dim=head_dim,
        rms_norm_eps=_from_float32(key("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings=tied,
        qkv_bias=arch.qkv_bias,
        rope_scaling=_gguf_rope_scaling(
            metadata, prefix, None if arch.gemma4 else rope_freqs, rope_factors, theta, head_dim, arch, source
        ),
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(
            dict.fromkeys(
                [
                    *(int(metadata[k]) for k in eos_keys if k in metadata),
                    *(_harmony_end_ids(metadata) if arch.gpt_oss else ()),
                ]
            )
        ),
        num_experts=experts,
        experts_per_token=per_token,
        o_bias=arch.gpt_oss,
        attention_sinks=arch.gpt_oss,
        expert_bias=arch.gpt_oss,
        expert_activation="swiglu_oai" if arch.gpt_oss else "silu",  # llama.cpp's alpha and limit: the defaults
        qk_norm=arch.qk_norm,
        sandwich_norms=arch.gemma,
        activation="gelu_tanh" if arch.gemma else "silu",
        embedding_scale=hidden**0.5 if arch.gemma else 1.0,
        attention_scale=_gguf_gemma_attention_scale(hidden, heads, layers) if arch.gemma else None,
        attn_softcap=_from_float32(key("attn_logit_softcapping", 0.0)) if arch.attn_softcap else 0.0,
        final_softcap=_from_float32(key("final_logit_softcapping", 0.0)),
        sliding_window=window,
        layer_types=layer_types,
        local_rope_theta=_from_float32(key("rope.freq_base_swa", 10000.0)) if arch.local_rope else None,
        rotary_dim=rotary_dim if rotary_dim != head_dim else 0,
        **_gguf_mrope(metadata, prefix, rotary_dim, source),
        attn_output_gate=arch.gated_delta_net,
        **(_gguf_linear_attention(key, arch.gguf_tiled_value_heads) if arch.gated_delta_net else {}),
        shared_expert_intermediate_size=int(metadata.get(f"{prefix}.expert_shared_feed_forward_length", 0)),
    )
    if arch.gemma3n:
        return replace(config, **_gguf_gemma_layers(key, config), **_gguf_gemma3n(key, widths))
    if arch.gemma4:
        return replace(config, **_gguf_gemma_layers(key, config), **_gguf_gemma4(key, config, kv_heads, widths,
                                                                                   rope_freqs))  # fmt: skip
    return config


def _gguf_gemma_layers(key: Callable[..., Any], config: ModelConfig) -> dict[str, Any]:
    """What Gemma 4 and 3n share under llama.cpp's keys: value norms, unscaled scores, KV shared by the last layers,
    per-layer embeddings (their table's rows the vocabulary's, as llama.cpp's converter pads it)."""
    ple = int(key("embedding_length_per_layer_input", 0))
    return {
        "value_norm": True,
        "attention_scale": 1.0,
        "num_kv_shared_layers": int(key("attention.shared_kv_layers", 0)),
        "per_layer_input_size": ple,
        "per_layer_vocab_size": config.vocab_size if ple else 0,
    }


def _gguf_gemma3n(key: Callable[..., Any], widths: list[int]) -> dict[str, Any]:
    """Gemma 3n under llama.cpp's keys: MLP widths per layer, AltUp's stream count and active stream, activation
    sparsity as each layer's normal quantile (-inf: none; the share cut is its normal CDF). The LAuReL rank and the
    per-layer table's rows come from the tensors (the loader's)."""
    quantiles = [float(q) for q in list(key("activation_sparsity_scale", []))]
    sparsity = [float(torch.distributions.Normal(0.0, 1.0).cdf(torch.tensor(q, dtype=torch.float64))) if q > -math.inf
                else 0.0 for q in quantiles]  # fmt: skip
    return {
        "intermediate_size": widths[0],
        "layer_intermediate_sizes": tuple(widths) if len(set(widths)) > 1 else (),
        "activation_sparsity": tuple(sparsity) if any(sparsity) else (),
        "altup_num_inputs": int(key("altup.num_inputs", 4)),
        "altup_active_idx": int(key("altup.active_idx", 0)),
        "altup_correct_scale": True,
    }


def _per_layer(value: Any, layers: int) -> list[int]:
    """A key llama.cpp writes as one number, or as one per layer where layers differ (Gemma 4's KV heads, MLPs)."""
    if isinstance(value, (np.ndarray, list, tuple)):
        return [int(v) for v in list(value)[:layers]]
    return [int(value)] * layers


def _gguf_gemma4(
    key: Callable[..., Any], config: ModelConfig, kv_heads: list[int], widths: list[int], rope_freqs: np.ndarray | None
) -> dict[str, Any]:
    """Gemma 4 under llama.cpp's keys: key_length is the full layers' head size (key_length_swa the others'), KV
    heads and MLP widths per layer (double-wide ones after the shared KV point; `widths` the experts' where it has
    them, beside the MLP), proportional rope as a rope_freqs tensor of 1 for each turned frequency and 1e30
    (stopped) for the rest. Its values come from its keys where a full layer lacks `attn_v` (the loader says)."""
    types = config.layer_types or ("sliding_attention",) * config.num_layers
    sliding = types.index("sliding_attention") if "sliding_attention" in types else 0
    full = types.index("full_attention") if "full_attention" in types else sliding
    full_dim = config.head_dim
    turned = int((rope_freqs == 1.0).sum()) if rope_freqs is not None else full_dim // 2
    shared = int(key("attention.shared_kv_layers", 0))
    sliding_dim = int(key("attention.key_length_swa", full_dim))
    dense = _per_layer(key("feed_forward_length"), config.num_layers)
    experts = {"expert_intermediate_size": widths[0], "expert_activation": "gelu_tanh"} if config.num_experts else {}
    return experts | {  # a full layer's own head size and KV heads: 0 where they are the others'
        "head_dim": sliding_dim,
        "full_head_dim": full_dim if full_dim != sliding_dim else 0,
        "num_kv_heads": kv_heads[sliding],
        "full_num_kv_heads": kv_heads[full] if kv_heads[full] != kv_heads[sliding] else 0,
        "intermediate_size": dense[0],
        "double_wide_shared_mlp": shared > 0 and dense[-1] == 2 * dense[0],
        "rotary_dim": 0,
        "rope_scaling": {"rope_type": "proportional", "partial_rotary_factor": turned / (full_dim // 2)},
        "layer_scalar": True,
    }


# The GGUF architectures whose rope llama.cpp turns by M-RoPE's `rope.dimension_sections`, and whether interleaved
# (its LLAMA_ROPE_TYPE_IMROPE, Qwen3-VL's and Qwen3.5's) or in turn (LLAMA_ROPE_TYPE_MROPE, Qwen2-VL's)
_MROPE_INTERLEAVED = {"qwen35": True, "qwen35moe": True, "qwen2vl": False, "qwen3vl": True}


def _gguf_mrope(metadata: Mapping[str, Any], prefix: str, rotary_dims: int, source: Path) -> dict[str, Any]:
    """M-RoPE's sections as llama.cpp reads them: `rope.dimension_sections`' first three counts (time, height,
    width; a fourth turns a vision encoder's extra position), for the architectures whose rope it turns by them.
    In turn, they cover the rotary half-dimensions exactly, as hf_config._hf_mrope asks; interleaved, at least (not
    at most, as it asks of a config.json): llama.cpp counts a frequency's sector modulo their sum, so sections short
    of the rotary frequencies wrap where transformers' do not, and its converter writes Qwen3.5's default
    [11, 11, 10] for a checkpoint without sections whatever its head's size (the counts past the rotary frequencies
    are never read, by either)."""
    sections = metadata.get(f"{prefix}.rope.dimension_sections")
    if prefix not in _MROPE_INTERLEAVED or sections is None:
        return {}
    interleaved, counts = _MROPE_INTERLEAVED[prefix], [int(n) for n in list(sections)]
    section, half = tuple(counts[:3]), rotary_dims // 2
    if len(section) != 3 or min(section) < 0 or not (sum(section) >= half if interleaved else sum(section) == half):
        raise ModelLoadError(f"{source}: {prefix}.rope.dimension_sections {counts} must begin with three counts of "
                             f"rotary frequencies adding up to {'at least ' if interleaved else ''}{half}")  # fmt: skip
    return {"mrope_section": section, "mrope_interleaved": interleaved}


def _gguf_hybrid_layer_types(metadata: Mapping[str, Any], prefix: str, layers: int) -> tuple[str, ...]:
    """Qwen3.5's layer types as llama.cpp reads them: a flag per layer (`attention.recurrent_layers`), else every
    `full_attention_interval`-th layer (4 by default) full attention."""
    flags = metadata.get(f"{prefix}.attention.recurrent_layers")
    if flags is not None:
        recurrent = [bool(flag) for flag in list(flags)[:layers]]
    else:
        interval = int(metadata.get(f"{prefix}.full_attention_interval", 4))
        recurrent = [(i + 1) % interval != 0 for i in range(layers)]
    return tuple("linear_attention" if flag else "full_attention" for flag in recurrent)


def _gguf_linear_attention(key: Callable[[str], Any], tiled: bool) -> dict[str, Any]:
    """The Gated DeltaNet sizes under llama.cpp's SSM keys: groups are key heads, the time-step rank the value heads,
    the state size a key head's, the inner size all value heads'. `tiled`: the family's converter stores value heads
    tiled by key head when there are more of them (ModelConfig.linear_value_heads_tiled)."""
    value_heads, key_heads = int(key("ssm.time_step_rank")), int(key("ssm.group_count"))
    return {
        "linear_num_key_heads": key_heads,
        "linear_num_value_heads": value_heads,
        "linear_value_heads_tiled": tiled and value_heads > key_heads,
        "linear_key_head_dim": int(key("ssm.state_size")),
        "linear_value_head_dim": int(key("ssm.inner_size")) // value_heads,
        "linear_conv_kernel": int(key("ssm.conv_kernel")),
    }


HARMONY_ENDS = ("<|return|>", "<|call|>")  # what ends a gpt-oss reply: its answer given, or a tool called


def _harmony_end_ids(metadata: Mapping[str, Any]) -> list[int]:
    """The ids of Harmony's end-of-reply tokens in a GGUF's vocabulary: its file names one end token, where a reply
    also ends at a call (llama.cpp finds them by their text too)."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        return []
    found = {token: i for i, token in enumerate(tokens.tolist() if hasattr(tokens, "tolist") else tokens)
             if token in HARMONY_ENDS}  # fmt: skip
    return [found[token] for token in HARMONY_ENDS if token in found]


def _gguf_sliding_window(
    arch: Architecture, metadata: Mapping[str, Any], prefix: str, layers: int
) -> tuple[int, tuple[str, ...]]:
    """llama.cpp slides only the families whose graphs it gives a window (Gemma 2/3 here; it runs Mistral and
    Phi-3 GGUFs with full attention, and so do we): every n-th layer global, n from
    `attention.sliding_window_pattern` or the family's default, or that key as one flag per layer."""
    window = int(metadata.get(f"{prefix}.attention.sliding_window") or 0)
    if not window or not arch.sliding_pattern:
        return 0, ()
    pattern = metadata.get(f"{prefix}.attention.sliding_window_pattern")
    pattern = arch.sliding_pattern if pattern is None or (np.ndim(pattern) == 0 and not pattern) else pattern
    if isinstance(pattern, np.ndarray):
        slides = [bool(flag) for flag in pattern[:layers]]
    else:
        slides = [bool((i + 1) % int(pattern)) for i in range(layers)]
    return window, tuple("sliding_attention" if slide else "full_attention" for slide in slides)


def _gguf_gemma_attention_scale(hidden: int, heads: int, layers: int) -> float | None:
    """GGUF does not keep Gemma's query_pre_attn_scalar: llama.cpp's rule is hidden/heads for the 27B models (46
    layers for Gemma 2, 62 for Gemma 3) and the head size otherwise (None), which is what their configs say."""
    return (hidden // heads) ** -0.5 if layers in (46, 62) else None


def _gguf_rope_scaling(
    metadata: Mapping[str, Any],
    prefix: str,
    rope_freqs: np.ndarray | None,
    rope_factors: tuple[np.ndarray, np.ndarray] | None,
    theta: float,
    head_dim: int,
    arch: Architecture,
    source: Path,
) -> dict | None:
    if rope_freqs is not None:
        return _llama3_scaling_from_rope_freqs(rope_freqs, theta, head_dim, source)
    original = metadata.get(f"{prefix}.rope.scaling.original_context_length")
    if rope_factors is not None:  # LongRoPE (Phi-3): no scaling type is written, only its factors and attn factor
        long, short = rope_factors
        scaling = {"rope_type": "longrope", "long_factor": long.tolist(), "short_factor": short.tolist()}
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        if metadata.get(f"{prefix}.rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = float(metadata[f"{prefix}.rope.scaling.attn_factor"])
        return scaling
    kind = metadata.get(f"{prefix}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"{source}: unsupported GGUF rope scaling type {kind!r}")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(metadata[f"{prefix}.rope.scaling.factor"])}
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    # YaRN's own settings, where the file has them (else Hugging Face's defaults: betas 32 and 1, mscale from factor)
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"), ("yarn_attn_factor",
                      "attention_factor")):  # fmt: skip
        if kind == "yarn" and metadata.get(f"{prefix}.rope.scaling.{key}") is not None:
            scaling[name] = float(metadata[f"{prefix}.rope.scaling.{key}"])
    if kind == "yarn" and arch.gpt_oss:  # its config says `truncate: false`, which GGUF does not record
        scaling["truncate"] = False
    return scaling


def _llama3_scaling_from_rope_freqs(freqs: np.ndarray, theta: float, head_dim: int, source: Path) -> dict:
    """Recover HF's llama3 `rope_scaling` from llama.cpp's per-frequency divisors (rope_freqs.weight).

    llama.cpp stores r_i = 1 for high frequencies, `factor` for low ones and 1 / ((1 - s_i) / factor + s_i) in
    between, where s_i is linear in 1 / wavelength_i and goes 0 -> 1 between the two boundary wavelengths. HF's
    formula depends only on `factor` and those two wavelengths (= original_max_position_embeddings / low or high
    freq factor), so with the usual original length of 8192 the two boundaries are recovered from the in-between
    frequencies by a straight-line fit."""
    inv_wavelen = 1.0 / (2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))  # [D/2]
    r = freqs.astype(np.float64)  # [D/2]
    factor = float(r.max())
    between = (r > 1 + 1e-6) & (r < factor * (1 - 1e-6))
    if factor <= 1 or between.sum() < 2:
        raise ModelLoadError(f"{source}: rope_freqs.weight does not follow llama3 rope scaling")
    s = (1 / r[between] - 1 / factor) / (1 - 1 / factor)  # rises 0 -> 1 as the wavelength shrinks
    slope, intercept = np.polyfit(inv_wavelen[between], s, 1)
    original = 8192
    low_wavelen, high_wavelen = slope / -intercept, slope / (1 - intercept)  # where s = 0 and s = 1
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(original / low_wavelen),
        "high_freq_factor": float(original / high_wavelen),
        "original_max_position_embeddings": original,
    }


def _from_float32(value: float) -> float:
    """GGUF stores float32: take the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06), which
    is the value the original config.json held."""
    return float(str(np.float32(value)))
