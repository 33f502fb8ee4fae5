"""The tensors (names and shapes) a ModelConfig implies, and the check of a checkpoint's against them.

Every loader (Hugging Face, GGUF, a tensor-parallel part, the MTP head) checks its weights here the same way, so a
checkpoint that does not match its config is refused at load time, naming the tensor, instead of failing far from
the cause inside the graph."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from sagellm.runtime.models.architectures.audio_weights import audio_weight_shapes
from sagellm.runtime.models.architectures.vision_weights import vision_weight_shapes
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.loaded import ModelLoadError


def encoder_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of the model's media encoders (its vision and audio towers and projectors)."""
    shapes = vision_weight_shapes(config.vision) if config.vision is not None else {}
    return shapes | (audio_weight_shapes(config.audio) if config.audio is not None else {})


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the graph builders read for `config` (its vision encoder's too), under its canonical Hugging Face
    name."""
    h, vocab = config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    shapes |= encoder_weight_shapes(config)
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
