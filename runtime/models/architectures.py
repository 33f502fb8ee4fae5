"""The architectures the runtime can run, and the translation of each format's metadata into a ModelConfig.

A Hugging Face config.json names its class in `architectures`; a GGUF file names its graph in
`general.architecture`. Both map here to a row of ARCHITECTURES, which says what the family adds to the Llama layer
(the features ModelConfig records for the one graph builder), and anything else is refused at load time with the
list of what is supported, instead of failing later inside the model graph. This module also knows which tensors
(names and shapes) a ModelConfig implies, so every loader checks its weights the same way."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.loaded import ModelLoadError


@dataclass(frozen=True)
class Architecture:
    name: str  # ModelConfig.architecture (Hugging Face's model_type)
    hf_classes: tuple[str, ...]  # config.json `architectures` entries
    gguf_arch: str | None  # GGUF `general.architecture`, the prefix of its metadata keys (None: written as another's)
    qkv_bias: bool = False
    # llama.cpp's converter reorders the rows of q/k of llama-arch models to suit its rope kernel (not for the others).
    gguf_qk_permuted: bool = False
    # Each layer's MLP is a router over experts. llama.cpp writes Mixtral as a "llama" GGUF with expert counts.
    moe: bool = False
    qk_norm: bool = False  # q/k RMSNorm per head (Qwen3, Gemma 3)
    # Gemma's layer: sandwich norms, GeGLU, embeddings scaled by sqrt(hidden), norm weights stored as offsets from 1.
    gemma: bool = False
    attn_softcap: bool = False  # reads attn_logit_softcapping (Gemma 2; Gemma 3 has the key and ignores it)
    # Which layers slide when the config does not list `layer_types`: every `sliding_pattern`-th layer is global, the
    # others slide (Gemma 2: 2, Gemma 3: `sliding_window_pattern`, 6 by default); 0: every layer slides.
    sliding_pattern: int = 0
    local_rope: bool = False  # sliding layers have their own unscaled rope (Gemma 3, theta 1e4 by default)
    fused_projections: bool = False  # q/k/v and gate/up stored as one tensor each (Phi-3), split at load
    # gpt-oss: biases on every attention projection, attention sinks, experts with biases and the clamped SwiGLU,
    # stored stacked per layer ([E, ...] tensors, gate and up interleaved), split into Mixtral's names at load.
    gpt_oss: bool = False
    # Qwen3.5: Gated DeltaNet layers (`layer_types` "linear_attention", every `full_attention_interval`-th layer full
    # attention), gated attention with partial rotary (a quarter of each head by default), and every RMSNorm but the
    # DeltaNet's own output norm stored as an offset from 1, like Gemma's.
    gated_delta_net: bool = False
    # llama.cpp's converter stores these Gated DeltaNet layers' value heads tiled by key head (gguf_layouts.py).
    gguf_tiled_value_heads: bool = False
    # Gemma 4: Gemma 3's layer with per-layer embeddings, the last layers attending over earlier layers' KV, full
    # attention layers with heads of their own size (and values from their keys), values normed, a scalar per
    # layer, scores unscaled (the q/k norms set their size), and norm weights stored as they are.
    gemma4: bool = False
    # Gemma 3n: Gemma 4's per-layer embeddings, shared KV and value norms (no layer scalars), with AltUp streams,
    # LAuReL and activation sparsity; its per-layer table reads row 0 for tokens beyond it.
    gemma3n: bool = False


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("LlamaForCausalLM",), "llama", gguf_qk_permuted=True),
    Architecture("mistral", ("MistralForCausalLM",), None),  # llama.cpp writes it as "llama" (with full attention)
    Architecture("qwen2", ("Qwen2ForCausalLM",), "qwen2", qkv_bias=True),
    Architecture("qwen3", ("Qwen3ForCausalLM",), "qwen3", qk_norm=True),
    Architecture("mixtral", ("MixtralForCausalLM",), "llama", gguf_qk_permuted=True, moe=True),
    Architecture("qwen3_moe", ("Qwen3MoeForCausalLM",), "qwen3moe", qk_norm=True, moe=True),
    Architecture("gemma2", ("Gemma2ForCausalLM",), "gemma2", gemma=True, attn_softcap=True, sliding_pattern=2),
    # Gemma 3 4B and up ship as Gemma3ForConditionalGeneration: its text model is served (the vision tower is not).
    Architecture("gemma3_text", ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), "gemma3", qk_norm=True,
                 gemma=True, sliding_pattern=6, local_rope=True),
    Architecture("gemma3n_text", ("Gemma3nForCausalLM", "Gemma3nForConditionalGeneration"), "gemma3n", qk_norm=True,
                 gemma=True, sliding_pattern=5, local_rope=True, gemma3n=True),
    # Gemma 4 ships as Gemma4ForConditionalGeneration: its text model is served (vision and audio are not).
    Architecture("gemma4_text", ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"), "gemma4", qk_norm=True,
                 gemma=True, sliding_pattern=6, local_rope=True, gemma4=True),
    Architecture("phi3", ("Phi3ForCausalLM",), "phi3", fused_projections=True),
    # llama.cpp slides gpt-oss's even layers (its GGUF does not say), as its config's layer_types do.
    Architecture("gpt_oss", ("GptOssForCausalLM",), "gpt-oss", qkv_bias=True, moe=True, sliding_pattern=2,
                 gpt_oss=True),
    # Qwen3.5 ships as Qwen3_5ForConditionalGeneration: its text model is served (the vision tower is not).
    Architecture("qwen3_5", ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"), "qwen35", qk_norm=True,
                 gated_delta_net=True, gguf_tiled_value_heads=True),
    # Its mixture of experts: Qwen's experts (a checkpoint holds each under its own name) and a gated shared expert.
    Architecture("qwen3_5_moe", ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"), "qwen35moe",
                 qk_norm=True, moe=True, gated_delta_net=True, gguf_tiled_value_heads=True),
    # Qwen3.5-MoE's forerunner: its DeltaNet's q, k, v, z and b, a projections fused per key head (split at load).
    Architecture("qwen3_next", ("Qwen3NextForCausalLM",), "qwen3next", qk_norm=True, moe=True, gated_delta_net=True),
)  # fmt: skip
BY_NAME: dict[str, Architecture] = {arch.name: arch for arch in ARCHITECTURES}
_SUPPORTED_HF = ", ".join(c for a in ARCHITECTURES for c in a.hf_classes)
_SUPPORTED_GGUF = ", ".join(dict.fromkeys(a.gguf_arch for a in ARCHITECTURES if a.gguf_arch))
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")  # transformers' names of the tanh-approximated GELU


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
        if arch.moe == moe or arch.gemma4:  # Gemma 4's experts (26B-A4B) are beside its MLP
            return arch
    raise ModelLoadError(f"{source}: a GGUF {gguf_arch!r} model with experts is not supported (only llama's: Mixtral)")


def config_from_hf(
    hf_config: Mapping[str, Any], generation_config: Mapping[str, Any] | None, source: Path
) -> ModelConfig:
    """Translate a config.json (plus generation_config.json, which often lists the chat end-of-turn tokens)."""
    arch = architecture_for_hf(hf_config, source)
    hf_config = _text_config(hf_config)
    activation = hf_config.get("hidden_activation") or hf_config.get("hidden_act") or "silu"
    if activation not in ("silu", *GELU_TANH):
        raise ModelLoadError(f"{source}: unsupported hidden activation {activation!r} (have silu, gelu_pytorch_tanh)")
    if (hf_config.get("attention_bias") and not arch.gpt_oss) or hf_config.get("mlp_bias"):
        raise ModelLoadError(f"{source}: attention_bias/mlp_bias (biases beyond q/k/v) are not supported")
    try:
        hidden, heads = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
        head_dim = int(hf_config.get("head_dim") or hidden // heads)
        layers = int(hf_config["num_hidden_layers"])
        theta, rope_scaling, local_theta, partial = _hf_rope(arch, hf_config, source)
        if arch.gated_delta_net:
            window, layer_types = 0, _hf_hybrid_layer_types(arch, hf_config, layers, source)
        else:
            window, layer_types = _hf_sliding_window(arch, hf_config, layers, source)
        shared = int(hf_config.get("shared_expert_intermediate_size") or 0) if arch.moe else 0
        eos = [*_ids(hf_config.get("eos_token_id")), *_ids((generation_config or {}).get("eos_token_id"))]
        experts, per_token = _hf_experts(arch, hf_config, source)
        inter = hf_config.get("moe_intermediate_size") or hf_config["intermediate_size"]
        inter = inter[0] if isinstance(inter, list) else inter  # Gemma 3n's, per layer (_hf_gemma3n)
        scalar = hf_config.get("query_pre_attn_scalar")
        config = ModelConfig(
            architecture=arch.name,
            vocab_size=int(hf_config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(inter),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(hf_config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", arch.gemma)),
            qkv_bias=arch.qkv_bias,
            rope_scaling=rope_scaling,
            bos_token_id=_first(_ids(hf_config.get("bos_token_id"))),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            num_experts=experts,
            experts_per_token=per_token,
            normalize_expert_weights=bool(hf_config.get("norm_topk_prob", True)),
            o_bias=arch.gpt_oss,
            attention_sinks=arch.gpt_oss,
            expert_bias=arch.gpt_oss,
            expert_activation="swiglu_oai" if arch.gpt_oss else "silu",
            swiglu_alpha=float(hf_config.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(hf_config.get("swiglu_limit", 7.0)),
            qk_norm=arch.qk_norm,
            sandwich_norms=arch.gemma,
            activation="silu" if activation == "silu" else "gelu_tanh",
            embedding_scale=hidden**0.5 if arch.gemma else 1.0,
            attention_scale=float(scalar) ** -0.5 if scalar else None,
            attn_softcap=float(hf_config.get("attn_logit_softcapping") or 0.0) if arch.attn_softcap else 0.0,
            final_softcap=float(hf_config.get("final_logit_softcapping") or 0.0),
            sliding_window=window,
            layer_types=layer_types,
            local_rope_theta=local_theta,
            rotary_dim=int(head_dim * partial) if partial != 1.0 else 0,
            attn_output_gate=arch.gated_delta_net,
            **(_hf_linear_attention(hf_config) if arch.gated_delta_net else {}),
            shared_expert_intermediate_size=shared,
            num_mtp_layers=int(hf_config.get("mtp_num_hidden_layers") or 0) if arch.gated_delta_net else 0,
        )
        if arch.gemma3n:
            return replace(config, **_hf_gemma3n(hf_config, layers, source))
        return replace(config, **_hf_gemma4(hf_config, layer_types, source)) if arch.gemma4 else config
    except KeyError as e:
        raise ModelLoadError(f"{source}: config.json lacks {e.args[0]!r}") from e


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
    arch = architecture_for_gguf(gguf_arch, experts > 0, source)
    _check_experts(experts, per_token, f"{gguf_arch}.expert_count/expert_used_count", source)
    prefix = arch.gguf_arch

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
        rope_scaling=_gguf_rope_scaling(metadata, prefix, None if arch.gemma4 else rope_freqs, rope_factors, theta,
                                        head_dim, arch, source),  # fmt: skip
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys([*(int(metadata[k]) for k in eos_keys if k in metadata),
                                           *(_harmony_end_ids(metadata) if arch.gpt_oss else ())])),  # fmt: skip
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


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the graph builder reads for `config`, under its canonical Hugging Face name."""
    h, vocab = config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    for j in range(config.altup_num_inputs - 1 if config.altup_num_inputs else 0):  # Gemma 3n's stream projections
        shapes |= {f"model.altup_projections.{j}.weight": (h, h), f"model.altup_unembed_projections.{j}.weight": (h, h)}
    if config.per_layer_input_size:
        size, width = config.per_layer_input_size, config.num_layers * config.per_layer_input_size
        shapes |= {"model.embed_tokens_per_layer.weight": (config.per_layer_vocab_size, width),
                   "model.per_layer_model_projection.weight": (width, h),
                   "model.per_layer_projection_norm.weight": (size,)}  # fmt: skip
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,)}
        if config.is_linear_attention(i):
            shapes |= _linear_attention_shapes(config, f"{p}linear_attn.")
        else:
            shapes |= _attention_shapes(config, i, f"{p}self_attn.")
        if config.per_layer_input_size:
            size = config.per_layer_input_size
            shapes |= {f"{p}per_layer_input_gate.weight": (size, h), f"{p}per_layer_projection.weight": (h, size)}
            shapes[f"{p}post_per_layer_input_norm.weight"] = (h,)
        if config.layer_scalar:
            shapes[f"{p}layer_scalar"] = (1,)
        if config.altup_num_inputs:
            shapes |= _altup_layer_shapes(config, p)
        inter = config.intermediate_size_of(i)
        if config.expert_intermediate_size:  # Gemma 4: the experts beside the MLP, their router and norms
            shapes |= _experts_beside_shapes(config, p)
        if config.is_moe and not config.expert_intermediate_size:
            shapes[f"{p}block_sparse_moe.gate.weight"] = (config.num_experts, h)
            for e in range(config.num_experts):
                x = f"{p}block_sparse_moe.experts.{e}."
                shapes |= {f"{x}w1.weight": (inter, h), f"{x}w3.weight": (inter, h), f"{x}w2.weight": (h, inter)}
                if config.expert_bias:
                    shapes |= {f"{x}w1.bias": (inter,), f"{x}w3.bias": (inter,), f"{x}w2.bias": (h,)}
            if config.expert_bias:
                shapes[f"{p}block_sparse_moe.gate.bias"] = (config.num_experts,)
            if config.shared_expert_intermediate_size:
                shared, s = f"{p}block_sparse_moe.shared_expert", config.shared_expert_intermediate_size
                shapes |= {f"{shared}.gate_proj.weight": (s, h), f"{shared}.up_proj.weight": (s, h)}
                shapes |= {f"{shared}.down_proj.weight": (h, s), f"{shared}_gate.weight": (1, h)}
        else:
            shapes |= {f"{p}mlp.gate_proj.weight": (inter, h), f"{p}mlp.up_proj.weight": (inter, h)}
            shapes[f"{p}mlp.down_proj.weight"] = (h, inter)
        if config.sandwich_norms:
            shapes |= {f"{p}pre_feedforward_layernorm.weight": (h,), f"{p}post_feedforward_layernorm.weight": (h,)}
    return shapes


def _altup_layer_shapes(config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """A Gemma 3n layer's AltUp router and coefficients, and its LAuReL branch."""
    h, k, rank = config.hidden_size, config.altup_num_inputs, config.laurel_rank
    return {f"{p}altup.correct_output_scale": (h,), f"{p}altup.correction_coefs.weight": (k, k),
            f"{p}altup.prediction_coefs.weight": (k * k, k), f"{p}altup.modality_router.weight": (k, h),
            f"{p}altup.router_norm.weight": (h,), f"{p}laurel.linear_left.weight": (rank, h),
            f"{p}laurel.linear_right.weight": (h, rank), f"{p}laurel.post_laurel_norm.weight": (h,)}  # fmt: skip


def _experts_beside_shapes(config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    h, size, experts = config.hidden_size, config.expert_intermediate_size, config.num_experts
    shapes = {f"{p}block_sparse_moe.gate.weight": (experts, h), f"{p}router.scale": (h,),
              f"{p}router.per_expert_scale": (experts,)}  # fmt: skip
    for e in range(experts):
        x = f"{p}block_sparse_moe.experts.{e}."
        shapes |= {f"{x}w1.weight": (size, h), f"{x}w3.weight": (size, h), f"{x}w2.weight": (h, size)}
    for norm in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
        shapes[f"{p}{norm}.weight"] = (h,)
    return shapes


def _attention_shapes(config: ModelConfig, i: int, p: str) -> dict[str, tuple[int, ...]]:
    """An attention layer's tensors (`p`: its `self_attn.` prefix); one attending over another's KV has no K/V
    projections, and one taking its values from its keys no v_proj."""
    h, d = config.hidden_size, config.head_dim_of(i)
    q, kv = config.num_heads * d, config.num_kv_heads_of(i) * d
    shapes = {f"{p}q_proj.weight": (2 * q if config.attn_output_gate else q, h), f"{p}o_proj.weight": (h, q)}
    own_kv = config.kv_source(i) == i
    if own_kv:
        shapes[f"{p}k_proj.weight"] = (kv, h)
        if not config.values_from_keys(i):
            shapes[f"{p}v_proj.weight"] = (kv, h)
    if config.qk_norm:
        shapes |= {f"{p}q_norm.weight": (d,), **({f"{p}k_norm.weight": (d,)} if own_kv else {})}
    if config.qkv_bias:
        shapes |= {f"{p}q_proj.bias": (q,), f"{p}k_proj.bias": (kv,), f"{p}v_proj.bias": (kv,)}
    if config.o_bias:
        shapes[f"{p}o_proj.bias"] = (h,)
    if config.attention_sinks:
        shapes[f"{p}sinks"] = (config.num_heads,)
    return shapes


def _linear_attention_shapes(config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """A Gated DeltaNet layer's tensors (`p`: its `linear_attn.` prefix)."""
    h, hv, dv = config.hidden_size, config.linear_num_value_heads, config.linear_value_head_dim
    conv = config.linear_conv_dim
    return {
        f"{p}in_proj_qkv.weight": (conv, h),
        f"{p}in_proj_z.weight": (hv * dv, h),
        f"{p}in_proj_b.weight": (hv, h),
        f"{p}in_proj_a.weight": (hv, h),
        f"{p}conv1d.weight": (conv, 1, config.linear_conv_kernel),
        f"{p}dt_bias": (hv,),
        f"{p}A_log": (hv,),
        f"{p}norm.weight": (dv,),
        f"{p}out_proj.weight": (h, hv * dv),
    }


_QWEN_EXPERTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}  # Qwen's expert projections, Mixtral's names


_LANGUAGE_MODEL = {"language_model.model.": "model.", "model.language_model.": "model.",
                   "language_model.lm_head.": "lm_head."}  # a multimodal checkpoint's text model  # fmt: skip


def canonical_name(config: ModelConfig, name: str) -> str | None:
    """The name the graph reads for a checkpoint's tensor, None for one it does not read: a multimodal checkpoint's
    text model drops its prefix (`language_model.model.` in transformers 4, `model.language_model.` in 5) and its
    vision tower and projector are not read; Qwen's mixture of experts (`mlp.gate`, `mlp.experts.{e}.gate_proj`,
    ...) takes Mixtral's names (`block_sparse_moe.gate`, `...experts.{e}.w1`), as llama.cpp gives both the same GGUF
    names; every other name is already the graph's."""
    for prefix, replacement in _LANGUAGE_MODEL.items():
        if name.startswith(prefix):
            name = replacement + name.removeprefix(prefix)
            break
    else:
        if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal",
                            "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
                            "model.visual.", "mtp.")):  # a vision tower; Qwen3.5's multi-token prediction head
            return None
    if config.num_kv_shared_layers and name.endswith(_KV_TENSORS) and _shares_kv(config, name):
        return None  # a layer attending over another's KV: checkpoints may still hold its unused K/V projections
    if config.expert_intermediate_size:  # Gemma 4's experts beside its MLP: the router's and experts' names
        head, dot, tail = name.partition(".router.proj.")
        if dot:
            return f"{head}.block_sparse_moe.gate.{tail}"
        head, dot, tail = name.partition(".experts.")
        return f"{head}.block_sparse_moe.experts.{_GEMMA4_EXPERTS.get(tail, tail)}" if dot else name
    if not config.is_moe or ".mlp." not in name:
        return name
    head, _, tail = name.partition(".mlp.")
    if tail.startswith("router."):  # gpt-oss's router
        return f"{head}.block_sparse_moe.gate.{tail.removeprefix('router.')}"
    stacked = tail.split(".")[1].removesuffix("_blocks").removesuffix("_scales") if "." in tail else ""
    if tail.startswith("experts.") and stacked in _STACKED_EXPERTS:  # gpt-oss's (MXFP4 too): split at load
        return f"{head}.block_sparse_moe.{tail}"
    if tail.startswith("experts."):
        _, expert, projection, rest = tail.split(".", 3)
        return f"{head}.block_sparse_moe.experts.{expert}.{_QWEN_EXPERTS.get(projection, projection)}.{rest}"
    return f"{head}.block_sparse_moe.{tail}"


_KV_TENSORS = tuple(f"self_attn.{t}.weight" for t in ("k_proj", "v_proj", "k_norm", "v_norm"))


def _shares_kv(config: ModelConfig, name: str) -> bool:
    layer = name.removeprefix("model.layers.").partition(".")[0]
    return layer.isdigit() and int(layer) < config.num_layers and config.kv_source(int(layer)) != int(layer)


def fused_parts(config: ModelConfig, name: str) -> list[tuple[str, slice | np.ndarray]] | None:
    """The parts of a fused projection as (name, its rows), or None for any other tensor, so the graph, tensor
    parallel and the fusion passes see each part's own name: Phi-3's qkv_proj and gate_up_proj (rows in runs:
    slices, which loaders keep as views), Qwen3-Next's Gated DeltaNet in_proj_qkvz and in_proj_ba (each key head's
    q, k, v, z, or b, a, in turn: row indices, gathered into Qwen3.5's in_proj_qkv, in_proj_z, in_proj_b,
    in_proj_a)."""
    prefix, dot, rest = name.rpartition("self_attn.qkv_proj.")
    if dot:
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        runs = (("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv))
        return [(f"{prefix}self_attn.{p}_proj.{rest}", slice(a, b)) for p, a, b in runs]
    prefix, dot, rest = name.rpartition("mlp.gate_up_proj.")
    if dot:
        i = config.intermediate_size
        return [(f"{prefix}mlp.gate_proj.{rest}", slice(0, i)), (f"{prefix}mlp.up_proj.{rest}", slice(i, 2 * i))]
    prefix, dot, rest = name.rpartition("linear_attn.in_proj_")
    if dot and rest.split(".")[0] in ("qkvz", "ba"):
        fused, _, rest = rest.partition(".")
        return [(f"{prefix}linear_attn.in_proj_{part}.{rest}", rows) for part, rows in _per_key_head(config, fused)]
    return None


def row_count(rows: slice | np.ndarray) -> int:
    """How many rows a part of `fused_parts` has."""
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


def take_rows(tensor: torch.Tensor, rows: slice | np.ndarray) -> torch.Tensor:
    """A part of a fused tensor (`fused_parts`): a view for a run of rows, a copy for gathered ones."""
    return tensor[rows] if isinstance(rows, slice) else tensor.index_select(0, torch.from_numpy(rows))


def _per_key_head(config: ModelConfig, fused: str) -> list[tuple[str, np.ndarray]]:
    """Qwen3-Next's fused DeltaNet projection rows, per key head g: [q_g, k_g, v_g, z_g] (Dk, Dk, r Dv, r Dv rows,
    r = Hv / Hk value heads per key head) or [b_g, a_g] (r rows each): which rows make each of Qwen3.5's parts."""
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    r = config.linear_num_value_heads // config.linear_num_key_heads
    sizes = {"qkvz": (dk, dk, r * dv, r * dv), "ba": (r, r)}[fused]
    starts = np.cumsum((0, *sizes))
    groups = np.arange(config.linear_num_key_heads)[:, None] * starts[-1]  # [Hk, 1]: each key head's first row
    runs = [(groups + np.arange(a, b)).reshape(-1) for a, b in zip(starts, starts[1:])]
    if fused == "ba":
        return [("b", runs[0]), ("a", runs[1])]
    return [("qkv", np.concatenate(runs[:3])), ("z", runs[3])]


# gpt-oss's stacked expert tensors (`mlp.experts.<name>`) and the projections their last dimension holds: gate and up
# interleaved (gate first), or down alone.
_STACKED_EXPERTS = {"gate_up_proj": ("w1", "w3"), "gate_up_proj_bias": ("w1", "w3"), "down_proj": ("w2",),
                    "down_proj_bias": ("w2",)}  # fmt: skip
# Gemma 4's stacked experts, [E, out, in] as Mixtral's per-expert weights: gate_up's first half of rows the gate's.
_GEMMA4_EXPERTS = {"gate_up_proj": "gate_up_halves", "down_proj": "down_rows"}
_HALVES = {"gate_up_halves": ("w1", "w3"), "down_rows": ("w2",)}


def expert_parts(name: str, tensor: Any) -> dict[str, Any] | None:
    """A layer's stacked experts (gpt-oss: `block_sparse_moe.experts.gate_up_proj` [E, H, 2I] with gate and up
    interleaved along the last dimension, `down_proj` [E, I, H], their biases [E, 2I] and [E, H]; Gemma 4:
    gate_up [E, 2I, H], gate's rows first, down [E, H, I]) as Mixtral's per-expert tensors (`experts.{e}.w1.weight`
    [I, H], ...), views of the stacked one; None for any other name."""
    head, dot, stacked = name.rpartition("block_sparse_moe.experts.")
    if dot and stacked in _HALVES:  # Gemma 4's: [E, out, in], each projection a run of rows
        projections = _HALVES[stacked]
        size = tensor.shape[1] // len(projections)
        return {f"{head}block_sparse_moe.experts.{e}.{projection}.weight": tensor[e, index * size : (index + 1) * size]
                for e in range(tensor.shape[0]) for index, projection in enumerate(projections)}  # fmt: skip
    if not dot or stacked not in _STACKED_EXPERTS:
        return None
    projections = _STACKED_EXPERTS[stacked]
    kind = "bias" if stacked.endswith("_bias") else "weight"
    parts: dict[str, Any] = {}
    for e in range(tensor.shape[0]):
        for index, projection in enumerate(projections):
            part = tensor[e, ..., index :: len(projections)]  # [H, I] or [I]
            parts[f"{head}block_sparse_moe.experts.{e}.{projection}.{kind}"] = part.T if kind == "weight" else part
    return parts


def stacked_expert_projections(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(the layer's expert prefix, the projections its rows hold in turn) of a stacked MXFP4 expert tensor
    (`...block_sparse_moe.experts.gate_up_proj`: rows w1, w3, w1, w3, ... of each expert's [2I, H]), else None."""
    head, dot, stacked = name.rpartition("block_sparse_moe.experts.")
    if not dot or stacked not in _STACKED_EXPERTS or stacked.endswith("_bias"):
        return None
    return f"{head}block_sparse_moe.experts.", _STACKED_EXPERTS[stacked]


def check_weights(
    config: ModelConfig,
    shapes: Mapping[str, tuple[int, ...]],
    source: Path,
    expected: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Refuse weights (their shapes by name) that do not match `config` (or `expected`, a part's) exactly: a wrong
    graph would fail far from the cause."""
    expected = expected_weight_shapes(config) if expected is None else expected
    missing = [name for name in expected if name not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{source}: missing tensor {missing[0]}{more}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise ModelLoadError(f"{source}: unexpected tensor {unexpected[0]} for a {config.architecture} model")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, expected {shape}")


def _hf_experts(arch: Architecture, hf_config: Mapping[str, Any], source: Path) -> tuple[int, int]:
    """(num_experts, experts_per_token) of a mixture of experts, (0, 0) for a dense model."""
    if not arch.moe:
        return 0, 0
    if int(hf_config.get("decoder_sparse_step") or 1) != 1 or hf_config.get("mlp_only_layers"):
        raise ModelLoadError(f"{source}: dense MLP layers between the sparse ones (decoder_sparse_step, "
                             "mlp_only_layers) are not supported")  # fmt: skip
    experts = int(hf_config.get("num_local_experts") or hf_config["num_experts"])
    per_token = int(hf_config["num_experts_per_tok"])
    _check_experts(experts, per_token, "num_local_experts/num_experts_per_tok", source)
    return experts, per_token


def _check_experts(experts: int, per_token: int, keys: str, source: Path) -> None:
    if experts and not 1 <= per_token <= experts:
        raise ModelLoadError(f"{source}: {keys} = {experts}/{per_token}: a token must use 1 to {experts} experts")


def _text_config(hf_config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's settings of a multimodal config (`text_config`, with the top level's token ids and
    tying where it has none of its own), or the config itself."""
    if "text_config" not in hf_config:
        return hf_config
    text = dict(hf_config["text_config"])
    for key in ("bos_token_id", "eos_token_id", "tie_word_embeddings", "architectures"):
        if key in hf_config and text.get(key) is None:
            text[key] = hf_config[key]
    return text


def _hf_sliding_window(
    arch: Architecture, hf_config: Mapping[str, Any], layers: int, source: Path
) -> tuple[int, tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers reads them: configs it wrote list `layer_types`; hub configs
    leave them to the family's rule (Qwen: layers from `max_window_layers` on, when `use_sliding_window`; Gemma:
    all but every n-th; Mistral, Phi-3: all). (0, ()) when no layer slides."""
    window = int(hf_config.get("sliding_window") or 0)
    if not window or hf_config.get("use_sliding_window") is False:
        return 0, ()
    types = hf_config.get("layer_types")
    if types is None:
        pattern = int(hf_config.get("sliding_window_pattern") or arch.sliding_pattern)
        first = int(hf_config.get("max_window_layers") or 0) if "use_sliding_window" in hf_config else 0
        types = ["sliding_attention" if (not pattern or (i + 1) % pattern) and i >= first else "full_attention"
                 for i in range(layers)]  # fmt: skip
    types = _checked_layer_types(types, ("sliding_attention", "full_attention"), arch, layers, source)
    if "sliding_attention" not in types:
        return 0, ()
    return window, (() if set(types) == {"sliding_attention"} else types)


def _hf_gemma4(hf_config: Mapping[str, Any], layer_types: tuple[str, ...], source: Path) -> dict[str, Any]:
    """Gemma 4's features: its full attention layers' head size and KV heads (`per_layer_config` as transformers
    writes it, else `global_head_dim`, 512 by default, and `num_global_key_value_heads` when values come from keys),
    KV sharing, per-layer embeddings."""
    if hf_config.get("use_bidirectional_attention") == "all":
        raise ModelLoadError(f"{source}: bidirectional attention (an embedding model) is not supported")
    values_from_keys = bool(hf_config.get("attention_k_eq_v"))
    full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    if "per_layer_config" in hf_config:  # transformers writes each layer's differences from the others
        per_layer = hf_config["per_layer_config"] or {}
        own = dict(per_layer.get(str(full[0]), per_layer.get(full[0], {}))) if full else {}
    else:
        own = {"head_dim": hf_config.get("global_head_dim", 512)}
        if values_from_keys and hf_config.get("num_global_key_value_heads") is not None:
            own["num_key_value_heads"] = hf_config["num_global_key_value_heads"]
    experts: dict[str, Any] = {}
    if hf_config.get("enable_moe_block"):  # experts beside the dense MLP (26B-A4B)
        experts = {"num_experts": int(hf_config["num_experts"]), "experts_per_token": int(hf_config["top_k_experts"]),
                   "expert_intermediate_size": int(hf_config["moe_intermediate_size"]),
                   "expert_activation": "gelu_tanh"}  # fmt: skip
        _check_experts(experts["num_experts"], experts["experts_per_token"], "num_experts/top_k_experts", source)
    return experts | _hf_gemma_layers(hf_config) | {
        "intermediate_size": int(hf_config["intermediate_size"]),
        "full_head_dim": int(own.get("head_dim") or 0),
        "full_num_kv_heads": int(own.get("num_key_value_heads") or 0),
        "full_values_from_keys": values_from_keys,
        "double_wide_shared_mlp": bool(hf_config.get("use_double_wide_mlp")),
        "layer_scalar": True,
    }


def _hf_gemma_layers(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """What Gemma 4 and 3n share: value norms, unscaled scores, KV shared by the last layers, per-layer embeddings."""
    ple = int(hf_config.get("hidden_size_per_layer_input") or 0)
    return {
        "value_norm": True,
        "attention_scale": 1.0,
        "num_kv_shared_layers": int(hf_config.get("num_kv_shared_layers") or 0),
        "per_layer_input_size": ple,
        "per_layer_vocab_size": int(hf_config.get("vocab_size_per_layer_input") or hf_config["vocab_size"]) if ple
        else 0,
    }


def _hf_gemma3n(hf_config: Mapping[str, Any], layers: int, source: Path) -> dict[str, Any]:
    """Gemma 3n's features: AltUp, LAuReL, MLP widths and activation sparsity per layer, and Gemma 4's per-layer
    embeddings, shared KV and value norms."""
    widths = hf_config["intermediate_size"]
    widths = [int(w) for w in widths] if isinstance(widths, list) else [int(widths)] * layers
    sparsity = hf_config.get("activation_sparsity_pattern")
    if sparsity is None:  # transformers' default: the first 10 layers cut 95% of each gate
        sparsity = [0.95] * (10 if layers > 10 else 0) + [0.0] * (layers - (10 if layers > 10 else 0))
    if len(widths) != layers or len(sparsity) != layers:
        raise ModelLoadError(f"{source}: intermediate_size and activation_sparsity_pattern need one value per layer")
    return _hf_gemma_layers(hf_config) | {
        "intermediate_size": widths[0],
        "layer_intermediate_sizes": tuple(widths) if len(set(widths)) > 1 else (),
        "activation_sparsity": tuple(float(s) for s in sparsity) if any(sparsity) else (),
        "altup_num_inputs": int(hf_config.get("altup_num_inputs", 4)),
        "altup_active_idx": int(hf_config.get("altup_active_idx", 0)),
        "altup_correct_scale": bool(hf_config.get("altup_correct_scale", True)),
        "laurel_rank": int(hf_config.get("laurel_rank", 64)),
    }


def _hf_hybrid_layer_types(
    arch: Architecture, hf_config: Mapping[str, Any], layers: int, source: Path
) -> tuple[str, ...]:
    """Qwen3.5's layer types: as listed, else every `full_attention_interval`-th layer (4 by default) full
    attention and the others Gated DeltaNet."""
    types = hf_config.get("layer_types")
    if types is None:
        interval = int(hf_config.get("full_attention_interval") or 4)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
    return _checked_layer_types(types, ("linear_attention", "full_attention"), arch, layers, source)


def _checked_layer_types(
    types: list[str], known: tuple[str, ...], arch: Architecture, layers: int, source: Path
) -> tuple[str, ...]:
    """`types` if it gives each layer one of the family's `known` types, else the error naming the first wrong."""
    types = tuple(types)
    unknown = next((i for i, kind in enumerate(types) if kind not in known), None)
    if unknown is not None:
        raise ModelLoadError(f"{source}: layer_types[{unknown}] is {types[unknown]!r}, not a layer type of "
                             f"{arch.name} ({', '.join(known)})")  # fmt: skip
    if len(types) != layers:
        raise ModelLoadError(f"{source}: layer_types must give each of the {layers} layers one of {', '.join(known)}")
    return types


def _hf_linear_attention(hf_config: Mapping[str, Any]) -> dict[str, int]:
    """The Gated DeltaNet layers' sizes (transformers' defaults where the config leaves them)."""
    return {
        "linear_num_key_heads": int(hf_config.get("linear_num_key_heads", 16)),
        "linear_num_value_heads": int(hf_config.get("linear_num_value_heads", 32)),
        "linear_key_head_dim": int(hf_config.get("linear_key_head_dim", 128)),
        "linear_value_head_dim": int(hf_config.get("linear_value_head_dim", 128)),
        "linear_conv_kernel": int(hf_config.get("linear_conv_kernel_dim", 4)),
    }


def _hf_rope(
    arch: Architecture, hf_config: Mapping[str, Any], source: Path
) -> tuple[float, dict | None, float | None, float]:
    """(rope_theta, rope_scaling, the sliding layers' own theta, partial_rotary_factor) from either spelling: hub
    configs carry rope_theta + rope_scaling (+ rope_local_base_freq, partial_rotary_factor), configs written by
    transformers>=5 carry one `rope_parameters` dict holding them, or one such dict per layer type (Gemma 3)."""
    parameters = dict(hf_config.get("rope_parameters") or {})
    local_theta = hf_config.get("rope_local_base_freq")
    if "full_attention" in parameters:
        local = parameters.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise ModelLoadError(f"{source}: scaled rope on sliding layers is not supported")
        local_theta = local.get("rope_theta", local_theta)
        parameters = dict(parameters["full_attention"])
    theta = float(parameters.pop("rope_theta", None) or hf_config.get("rope_theta") or 10000.0)
    scaling = dict(hf_config.get("rope_scaling") or parameters)
    scaling.pop("rope_theta", None)
    if scaling.get("rope_type") == "proportional":  # Gemma 4: the factor is the type's own (rope.py), not partial
        scaling.setdefault("partial_rotary_factor", 1.0)
        return theta, scaling, float(local_theta or 10000.0), 1.0
    partial = scaling.pop("partial_rotary_factor", None) or hf_config.get("partial_rotary_factor")
    partial = float(partial or (0.25 if arch.gated_delta_net else 1.0))  # Qwen3.5's default: a quarter
    for key in ("mrope_section", "mrope_interleaved"):  # Qwen3.5's multimodal rope: for text, plain rope
        scaling.pop(key, None)
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    if scaling.get("rope_type") == "su":  # Phi-3's first name for longrope
        scaling["rope_type"] = "longrope"
    if hf_config.get("original_max_position_embeddings") and scaling.get("rope_type") == "longrope":
        scaling["original_max_position_embeddings"] = int(hf_config["original_max_position_embeddings"])
    local = float(local_theta or 10000.0) if arch.local_rope else None
    return theta, (scaling if scaling.get("rope_type", "default") != "default" else None), local, partial


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


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _first(ids: list[int]) -> int | None:
    return ids[0] if ids else None
