"""The architectures the runtime can run, and the translation of each format's metadata into a ModelConfig.

A Hugging Face config.json names its class in `architectures`; a GGUF file names its graph in
`general.architecture`. Both map here to one of our graph builders ("llama", "qwen2" or "mixtral"), and anything else is
refused at load time with a clear error instead of failing later inside the model graph. This module also knows
which tensors (names and shapes) a ModelConfig implies, so every loader checks its weights the same way."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.loaded import ModelLoadError


@dataclass(frozen=True)
class Architecture:
    name: str  # our graph builder's name, ModelConfig.architecture
    hf_classes: tuple[str, ...]  # config.json `architectures` entries
    gguf_arch: str  # GGUF `general.architecture`, also the prefix of its metadata keys
    qkv_bias: bool
    # llama.cpp's converter reorders the rows of q/k of llama-arch models to suit its rope kernel; not for qwen2.
    gguf_qk_permuted: bool
    # Each layer's MLP is a router over experts. llama.cpp writes Mixtral as a "llama" GGUF with expert counts.
    moe: bool = False


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("LlamaForCausalLM",), "llama", qkv_bias=False, gguf_qk_permuted=True),
    Architecture("qwen2", ("Qwen2ForCausalLM",), "qwen2", qkv_bias=True, gguf_qk_permuted=False),
    Architecture("mixtral", ("MixtralForCausalLM",), "llama", qkv_bias=False, gguf_qk_permuted=True, moe=True),
)
BY_NAME: dict[str, Architecture] = {arch.name: arch for arch in ARCHITECTURES}
_SUPPORTED_HF = ", ".join(c for a in ARCHITECTURES for c in a.hf_classes)
_SUPPORTED_GGUF = ", ".join(dict.fromkeys(a.gguf_arch for a in ARCHITECTURES))


def architecture_for_hf(hf_config: Mapping[str, Any], source: Path) -> Architecture:
    classes = hf_config.get("architectures") or []
    for arch in ARCHITECTURES:
        if any(c in arch.hf_classes for c in classes) or (not classes and hf_config.get("model_type") == arch.name):
            return arch
    found = ", ".join(classes) or hf_config.get("model_type") or "none given"
    raise ModelLoadError(f"{source}: unsupported architecture {found} (supported: {_SUPPORTED_HF})")


def architecture_for_gguf(gguf_arch: str | None, moe: bool, source: Path) -> Architecture:
    """`moe`: the metadata counts experts (a "llama" GGUF with experts is Mixtral)."""
    matches = [arch for arch in ARCHITECTURES if arch.gguf_arch == gguf_arch]
    if not matches:
        raise ModelLoadError(f"{source}: unsupported GGUF architecture {gguf_arch!r} (supported: {_SUPPORTED_GGUF})")
    for arch in matches:
        if arch.moe == moe:
            return arch
    raise ModelLoadError(f"{source}: a GGUF {gguf_arch!r} model with experts is not supported (only llama's: Mixtral)")


def config_from_hf(
    hf_config: Mapping[str, Any], generation_config: Mapping[str, Any] | None, source: Path
) -> ModelConfig:
    """Translate a config.json (plus generation_config.json, which often lists the chat end-of-turn tokens)."""
    arch = architecture_for_hf(hf_config, source)
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{source}: unsupported hidden_act {hf_config['hidden_act']!r} (only silu)")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise ModelLoadError(f"{source}: attention_bias/mlp_bias (biases beyond q/k/v) are not supported")
    if hf_config.get("use_sliding_window"):
        raise ModelLoadError(f"{source}: sliding-window attention (use_sliding_window=true) is not supported")
    try:
        hidden, heads = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
        theta, rope_scaling = _hf_rope(hf_config)
        eos = [*_ids(hf_config.get("eos_token_id")), *_ids((generation_config or {}).get("eos_token_id"))]
        experts, per_token = _hf_experts(arch, hf_config, source)
        return ModelConfig(
            architecture=arch.name,
            vocab_size=int(hf_config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf_config["intermediate_size"]),
            num_layers=int(hf_config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
            head_dim=int(hf_config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(hf_config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            qkv_bias=arch.qkv_bias,
            rope_scaling=rope_scaling,
            bos_token_id=_first(_ids(hf_config.get("bos_token_id"))),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            num_experts=experts,
            experts_per_token=per_token,
        )
    except KeyError as e:
        raise ModelLoadError(f"{source}: config.json lacks {e.args[0]!r}") from e


def config_from_gguf(
    metadata: Mapping[str, Any], *, tied: bool, token_count: int | None, rope_freqs: np.ndarray | None, source: Path
) -> ModelConfig:
    """Translate GGUF metadata (scalar keys only); `tied` is whether the file lacks output.weight and `rope_freqs`
    the llama3-style per-frequency divisors llama.cpp stores as a tensor instead of as metadata."""
    gguf_arch = metadata.get("general.architecture")
    experts = int(metadata.get(f"{gguf_arch}.expert_count", 0))
    per_token = int(metadata.get(f"{gguf_arch}.expert_used_count", 0))
    arch = architecture_for_gguf(gguf_arch, experts > 0, source)
    _check_experts(experts, per_token, f"{gguf_arch}.expert_count/expert_used_count", source)
    prefix = arch.gguf_arch

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{prefix}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{source}: GGUF metadata lacks {prefix}.{name}")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    theta = _from_float32(key("rope.freq_base", 10000.0))
    eos_keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    return ModelConfig(
        architecture=arch.name,
        vocab_size=int(key("vocab_size", token_count)),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=_from_float32(key("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings=tied,
        qkv_bias=arch.qkv_bias,
        rope_scaling=_gguf_rope_scaling(metadata, prefix, rope_freqs, theta, head_dim, source),
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(metadata[k]) for k in eos_keys if k in metadata)),
        num_experts=experts,
        experts_per_token=per_token,
    )


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the graph builder reads for `config`, under its canonical Hugging Face name."""
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            f"{p}self_attn.q_proj.weight": (q, h),
            f"{p}self_attn.k_proj.weight": (kv, h),
            f"{p}self_attn.v_proj.weight": (kv, h),
            f"{p}self_attn.o_proj.weight": (h, q),
            f"{p}input_layernorm.weight": (h,),
            f"{p}post_attention_layernorm.weight": (h,),
        }
        if config.is_moe:
            shapes[f"{p}block_sparse_moe.gate.weight"] = (config.num_experts, h)
            for e in range(config.num_experts):
                x = f"{p}block_sparse_moe.experts.{e}."
                shapes |= {f"{x}w1.weight": (inter, h), f"{x}w3.weight": (inter, h), f"{x}w2.weight": (h, inter)}
        else:
            shapes |= {f"{p}mlp.gate_proj.weight": (inter, h), f"{p}mlp.up_proj.weight": (inter, h)}
            shapes[f"{p}mlp.down_proj.weight"] = (h, inter)
        if config.qkv_bias:
            shapes |= {f"{p}self_attn.q_proj.bias": (q,), f"{p}self_attn.k_proj.bias": (kv,)}
            shapes[f"{p}self_attn.v_proj.bias"] = (kv,)
    return shapes


def check_weights(config: ModelConfig, weights: Mapping[str, torch.Tensor], source: Path) -> None:
    """Refuse weights that do not match `config` exactly: a wrong graph would fail far from the cause."""
    expected = expected_weight_shapes(config)
    missing = [name for name in expected if name not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{source}: missing tensor {missing[0]}{more}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ModelLoadError(f"{source}: unexpected tensor {unexpected[0]} for a {config.architecture} model")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(weights[name].shape)}, expected {shape}")


def _hf_experts(arch: Architecture, hf_config: Mapping[str, Any], source: Path) -> tuple[int, int]:
    """(num_experts, experts_per_token) of a mixture of experts, (0, 0) for a dense model."""
    if not arch.moe:
        return 0, 0
    window = hf_config.get("sliding_window")
    if window and int(window) < int(hf_config.get("max_position_embeddings", 2048)):
        raise ModelLoadError(f"{source}: sliding-window attention (sliding_window={window}) is not supported")
    experts, per_token = int(hf_config["num_local_experts"]), int(hf_config["num_experts_per_tok"])
    _check_experts(experts, per_token, "num_local_experts/num_experts_per_tok", source)
    return experts, per_token


def _check_experts(experts: int, per_token: int, keys: str, source: Path) -> None:
    if experts and not 1 <= per_token <= experts:
        raise ModelLoadError(f"{source}: {keys} = {experts}/{per_token}: a token must use 1 to {experts} experts")


def _hf_rope(hf_config: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either spelling: hub configs carry rope_theta + rope_scaling, configs
    written by transformers>=5 carry one `rope_parameters` dict holding both."""
    parameters = dict(hf_config.get("rope_parameters") or {})
    theta = float(hf_config.get("rope_theta") or parameters.pop("rope_theta", 10000.0))
    scaling = dict(hf_config.get("rope_scaling") or parameters)
    scaling.pop("rope_theta", None)
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    return theta, (scaling if scaling.get("rope_type", "default") != "default" else None)


def _gguf_rope_scaling(
    metadata: Mapping[str, Any], prefix: str, rope_freqs: np.ndarray | None, theta: float, head_dim: int, source: Path
) -> dict | None:
    if rope_freqs is not None:
        return _llama3_scaling_from_rope_freqs(rope_freqs, theta, head_dim, source)
    kind = metadata.get(f"{prefix}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"{source}: unsupported GGUF rope scaling type {kind!r}")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(metadata[f"{prefix}.rope.scaling.factor"])}
    original = metadata.get(f"{prefix}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    # YaRN's own settings, where the file has them (else Hugging Face's defaults: betas 32 and 1, mscale from factor)
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"), ("yarn_attn_factor",
                      "attention_factor")):  # fmt: skip
        if kind == "yarn" and metadata.get(f"{prefix}.rope.scaling.{key}") is not None:
            scaling[name] = float(metadata[f"{prefix}.rope.scaling.{key}"])
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


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _first(ids: list[int]) -> int | None:
    return ids[0] if ids else None
