"""A Hugging Face config.json (and generation_config.json) translated into a ModelConfig.

Each family spells its settings its own way (and transformers 5 respells rope); this module reads every spelling
into the one ModelConfig the graph builder reads, and refuses settings the graph does not implement with the key to
blame, at load time instead of inside the graph."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sagellm.runtime.models.architectures.families import Architecture, architecture_for_hf, check_experts
from sagellm.runtime.models.architectures.hf_audio_config import audio_from_hf
from sagellm.runtime.models.architectures.hf_vision_config import GELU_TANH, vision_from_hf
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.loaded import ModelLoadError


def config_from_hf(
    hf_config: Mapping[str, Any], generation_config: Mapping[str, Any] | None, source: Path
) -> ModelConfig:
    """Translate a config.json (plus generation_config.json, which often lists the chat end-of-turn tokens)."""
    arch = architecture_for_hf(hf_config, source)
    whole, hf_config = hf_config, _text_config(hf_config)
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
            **_hf_mrope(hf_config, head_dim * partial, source, whole.get("architectures") or ()),
            attn_output_gate=arch.gated_delta_net,
            **(_hf_linear_attention(hf_config) if arch.gated_delta_net else {}),
            shared_expert_intermediate_size=shared,
            num_mtp_layers=int(hf_config.get("mtp_num_hidden_layers") or 0) if arch.gated_delta_net else 0,
            vision=vision_from_hf(whole, int(hf_config["hidden_size"]), source),
            audio=audio_from_hf(whole, int(hf_config["hidden_size"]), source),
        )
        if arch.gemma3n:
            return replace(config, **_hf_gemma3n(hf_config, layers, source))
        return replace(config, **_hf_gemma4(hf_config, layer_types, source)) if arch.gemma4 else config
    except KeyError as e:
        raise ModelLoadError(f"{source}: config.json lacks {e.args[0]!r}") from e


def _hf_experts(arch: Architecture, hf_config: Mapping[str, Any], source: Path) -> tuple[int, int]:
    """(num_experts, experts_per_token) of a mixture of experts, (0, 0) for a dense model."""
    if not arch.moe:
        return 0, 0
    if int(hf_config.get("decoder_sparse_step") or 1) != 1 or hf_config.get("mlp_only_layers"):
        raise ModelLoadError(f"{source}: dense MLP layers between the sparse ones (decoder_sparse_step, "
                             "mlp_only_layers) are not supported")  # fmt: skip
    experts = int(hf_config.get("num_local_experts") or hf_config["num_experts"])
    per_token = int(hf_config["num_experts_per_tok"])
    check_experts(experts, per_token, "num_local_experts/num_experts_per_tok", source)
    return experts, per_token


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
        check_experts(experts["num_experts"], experts["experts_per_token"], "num_experts/top_k_experts", source)
    return (
        experts
        | _hf_gemma_layers(hf_config)
        | {
            "intermediate_size": int(hf_config["intermediate_size"]),
            "full_head_dim": int(own.get("head_dim") or 0),
            "full_num_kv_heads": int(own.get("num_key_value_heads") or 0),
            "full_values_from_keys": values_from_keys,
            "double_wide_shared_mlp": bool(hf_config.get("use_double_wide_mlp")),
            "layer_scalar": True,
        }
    )


def _hf_gemma_layers(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """What Gemma 4 and 3n share: value norms, unscaled scores, KV shared by the last layers, per-layer embeddings."""
    ple = int(hf_config.get("hidden_size_per_layer_input") or 0)
    return {
        "value_norm": True,
        "attention_scale": 1.0,
        "num_kv_shared_layers": int(hf_config.get("num_kv_shared_layers") or 0),
        "per_layer_input_size": ple,
        "per_layer_vocab_size": int(hf_config.get("vocab_size_per_layer_input") or hf_config["vocab_size"])
        if ple
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
    if scaling.get("rope_type") == "mrope":  # Qwen2-VL's hub spelling: plain rope's angles (its sections: _hf_mrope)
        scaling["rope_type"] = "default"
    if scaling.get("rope_type") == "su":  # Phi-3's first name for longrope
        scaling["rope_type"] = "longrope"
    if hf_config.get("original_max_position_embeddings") and scaling.get("rope_type") == "longrope":
        scaling["original_max_position_embeddings"] = int(hf_config["original_max_position_embeddings"])
    local = float(local_theta or 10000.0) if arch.local_rope else None
    return theta, (scaling if scaling.get("rope_type", "default") != "default" else None), local, partial


# The classes whose text model transformers turns by interleaved M-RoPE whatever the config says, and the sections
# it takes where the config gives none
_INTERLEAVED_MROPE = {
    "Qwen3VLForConditionalGeneration": (24, 20, 20),
    "Qwen3VLMoeForConditionalGeneration": (24, 20, 20),
    "Qwen3_5ForConditionalGeneration": (11, 11, 10),
    "Qwen3_5MoeForConditionalGeneration": (11, 11, 10),
}


def _hf_mrope(
    hf_config: Mapping[str, Any], rotary_dims: float, source: Path, classes: Sequence[str] = ()
) -> dict[str, Any]:
    """Qwen-VL's multimodal rope sections, from `rope_parameters` (transformers 5) or `rope_scaling` (hub configs of
    Qwen2-VL and Qwen2.5-VL, whose type "mrope" is plain rope's angles), if it has them (Qwen3-VL's and Qwen3.5's
    multimodal classes: always, interleaved, their defaults where missing): in turn they cover the rotary
    half-dimensions; interleaved, at most those (the rest turn by time)."""
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    forced = next((_INTERLEAVED_MROPE[c] for c in classes if c in _INTERLEAVED_MROPE), None)
    if not rope.get("mrope_section") and forced is None:
        return {}
    section = tuple(int(n) for n in rope.get("mrope_section") or forced)
    interleaved = forced is not None or bool(rope.get("mrope_interleaved", False))
    half = int(rotary_dims) // 2
    if len(section) != 3 or not (sum(section) <= half if interleaved else sum(section) == half):
        raise ModelLoadError(f"{source}: mrope_section {list(section)} must be three counts of rotary frequencies "
                             f"adding up to {half}")  # fmt: skip
    return {"mrope_section": section, "mrope_interleaved": interleaved}


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _first(ids: list[int]) -> int | None:
    return ids[0] if ids else None
