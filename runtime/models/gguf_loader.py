"""Loads a GGUF file (llama.cpp's format): config from its metadata, weights under the canonical Hugging Face names,
tokenizer and chat template from its metadata.

The file is read by `gguf_file` (a memory map; metadata arrays left undecoded) and dequantized by `dequantize`
(whole tensors in numpy, bit for bit gguf-py's results). Weights stored in a kind some backend's kernels read
directly (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4: KEPT_KINDS) are kept as their blocks
(`LoadedModel.quantized`; stacked experts each as its own) and dequantized only if a backend asks for their floats:
the CPU's kernels read the blocks, so they never are.

llama.cpp's rearrangements are undone so the weights equal the Hugging Face ones: llama-arch q/k rows permuted for
its rope kernel, Qwen3.5's value heads tiled and values changed (gguf_layouts.py), and tied embeddings expressed by
leaving out output.weight. A mixture of
experts (Mixtral, a "llama" GGUF with `llama.expert_count`; Qwen3-MoE) stacks each layer's experts into one tensor
per projection, [E, out, in]; each expert becomes its own Hugging Face name again. Names differ by family where
llama.cpp reuses one for another role: Gemma's `ffn_norm` is its pre-MLP norm beside post-attention and post-MLP
ones, Phi-3's `ffn_up` is gate and up fused (split here, as `attn_qkv` is), gpt-oss's and Qwen3.5's pre-MLP norm is
their `post_attention_norm`, Qwen3.5's `attn_qkv` is its Gated DeltaNet's input projection, and Gemma 4's norms are
stored as they are (Gemma 2's and 3's as 1 + w, which is what the graph reads)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from sagellm.backends.quantized import KEPT_KINDS, QuantizedWeight
from sagellm.runtime.models.architectures.checkpoint_names import fused_parts, row_count, take_rows
from sagellm.runtime.models.architectures.families import BY_NAME
from sagellm.runtime.models.architectures.gguf_config import config_from_gguf
from sagellm.runtime.models.architectures.weight_shapes import check_weights
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.dequantize import dequantize
from sagellm.runtime.models.gguf_file import CorruptGGUF, GGUFFile, GGUFTensor, read_gguf
from sagellm.runtime.models.gguf_layouts import restore_values, row_order
from sagellm.runtime.models.loaded import LoadedModel, ModelLoadError, WeightsOnRead, describe
from sagellm.runtime.models.sampling_defaults import from_gguf_metadata
from sagellm.runtime.models.tokenizer import load_gguf_tokenizer

Q = GGMLQuantizationType
SUPPORTED_TYPES = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.MXFP4}
)
_SUPPORTED_NAMES = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
_ARCH_NAMES = "/".join(BY_NAME)

ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling as per-frequency divisors; consumed by the config
ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")  # LongRoPE's, as tensors; the config's too
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",  # Gemma 4's per-layer embeddings
    "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",  # gpt-oss's
    "attn_sinks.weight": "self_attn.sinks",
    "ffn_gate_inp.bias": "block_sparse_moe.gate.bias",
}
_SANDWICH_NAMES = {  # Gemma: a norm after attention and one each side of the MLP
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GEMMA4_NAMES = {  # Gemma 4's per-layer input block and layer scalar
    "inp_gate.weight": "per_layer_input_gate.weight",
    "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
    "layer_output_scale.weight": "layer_scalar",
    "ffn_gate_inp.scale": "router.scale",  # its experts' routing norm and per-expert scales (26B-A4B)
    "ffn_down_exps.scale": "router.per_expert_scale",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
}
_GEMMA3N_NAMES = _GEMMA4_NAMES | {  # Gemma 3n's AltUp router and coefficients, and its LAuReL branch
    "altup_correct_coef.weight": "altup.correction_coefs.weight",
    "altup_correct_scale.weight": "altup.correct_output_scale",
    "altup_predict_coef.weight": "altup.prediction_coefs.weight",
    "altup_router.weight": "altup.modality_router.weight",
    "altup_router_norm.weight": "altup.router_norm.weight",
    "laurel_l.weight": "laurel.linear_left.weight",
    "laurel_r.weight": "laurel.linear_right.weight",
    "laurel_post_norm.weight": "laurel.post_laurel_norm.weight",
}
ALTUP_STACKED = {"altup_proj.weight": "altup_projections", "altup_unembd_proj.weight": "altup_unembed_projections"}
_FUSED_NAMES = {"ffn_up.weight": "mlp.gate_up_proj.weight"}  # Phi-3: gate's rows, then up's
_POST_ATTENTION_NORM = {"post_attention_norm.weight": "post_attention_layernorm.weight"}  # gpt-oss's pre-MLP norm
_GATED_DELTA_NET_NAMES = {  # Qwen3.5: its linear attention layers' tensors, and its pre-MLP norm
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight",
    "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight",
    "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_a": "linear_attn.A_log",
    "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ssm_ba.weight": "linear_attn.in_proj_ba.weight",  # Qwen3-Next's b and a, fused per key head
    "ffn_gate_inp_shexp.weight": "block_sparse_moe.shared_expert_gate.weight",  # Qwen3.5-MoE's shared expert
    "ffn_gate_shexp.weight": "block_sparse_moe.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "block_sparse_moe.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "block_sparse_moe.shared_expert.down_proj.weight",
}
_EXPERT_NAMES = {  # a layer's experts stacked, [E, out, in] -> each expert's projection
    "ffn_gate_up_exps.weight": "w1+w3.weight",  # Gemma 4's gate and up, one tensor: w1's rows, then w3's
    "ffn_gate_exps.weight": "w1.weight",
    "ffn_up_exps.weight": "w3.weight",
    "ffn_down_exps.weight": "w2.weight",
    "ffn_gate_exps.bias": "w1.bias",  # gpt-oss's, [E, out]
    "ffn_up_exps.bias": "w3.bias",
    "ffn_down_exps.bias": "w2.bias",
}


def load_gguf(path: Path, *, name: str, dtype: torch.dtype, load_tokenizer: bool, load_weights: bool) -> LoadedModel:
    parsed = _open(path)
    for tensor in parsed.tensors.values():  # refuse what we cannot load before any slow work
        _check_type(path, tensor)
    metadata, tensors = parsed.metadata, dict(parsed.tensors)
    tokens = metadata.get("tokenizer.ggml.tokens")  # only its length is read: the strings stay undecoded
    rope_freqs = _dense(tensors.pop(ROPE_FREQS)) if ROPE_FREQS in tensors else None
    factors = [_dense(tensors.pop(name)) for name in ROPE_FACTORS if name in tensors]
    config = config_from_gguf(
        metadata,
        tied="output.weight" not in tensors,
        token_count=len(tokens) if tokens is not None else None,
        rope_freqs=rope_freqs,
        rope_factors=(factors[0], factors[1]) if len(factors) == 2 else None,
        source=path,
    )
    if BY_NAME[config.architecture].gemma3n:  # the LAuReL rank and the per-layer table's rows, as the file has them
        sizes = {"laurel_rank": "blk.0.laurel_l.weight", "per_layer_vocab_size": "per_layer_token_embd.weight"}
        config = replace(config, **{key: tensors[name].shape[0] for key, name in sizes.items() if name in tensors})
    if BY_NAME[config.architecture].gemma4:  # its full layers take values from keys where they lack attn_v
        full = [i for i in config.kv_layers if config.layer_types and config.layer_types[i] == "full_attention"]
        config = replace(config, full_values_from_keys=any(f"blk.{i}.attn_v.weight" not in tensors for i in full))
    weights, quantized = _read_weights(path, tensors, config, dtype) if load_weights else ({}, {})
    tokenizer = load_gguf_tokenizer(path) if load_tokenizer else None
    template = metadata.get("tokenizer.chat_template")
    defaults = from_gguf_metadata(metadata)
    return LoadedModel(
        config, weights, tokenizer, template, path, name, quantized, sampling_defaults=defaults, mapped=parsed.buffer
    )


def _read_weights(
    path: Path, tensors: dict[str, GGUFTensor], config: ModelConfig, dtype: torch.dtype
) -> tuple[WeightsOnRead, dict[str, QuantizedWeight]]:
    """The tensors in `dtype` under their Hugging Face names. The 2-D ones of a kept kind (for fp32 models: the block
    kernels compute in fp32) are kept as their blocks and dequantized only if read; the others are dequantized now."""
    arch = BY_NAME[config.architecture]
    layer_names = _LAYER_NAMES | (_SANDWICH_NAMES if arch.gemma else {})
    layer_names |= _FUSED_NAMES if arch.fused_projections else {}
    layer_names |= _GEMMA4_NAMES if arch.gemma4 else _GEMMA3N_NAMES if arch.gemma3n else {}
    layer_names |= _POST_ATTENTION_NORM if arch.gpt_oss else {}
    layer_names |= _GATED_DELTA_NET_NAMES if arch.gated_delta_net else {}
    tensors = {name: t for name, t in tensors.items() if not _prediction_block(name, config.num_layers)}
    altup = {name: tensors.pop(name) for name in ALTUP_STACKED if name in tensors}
    hf_names = {gguf_name: _hf_name(path, gguf_name, layer_names) for gguf_name in tensors}  # fail before slow work
    ready: dict[str, torch.Tensor] = {}
    on_read: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = {}
    quantized: dict[str, QuantizedWeight] = {}
    for gguf_name, tensor in altup.items():  # Gemma 3n's stream projections, stacked [K-1, H, H]: each its own
        stacked = torch.from_numpy(_dense(tensor)).to(dtype)
        ready |= {f"model.{ALTUP_STACKED[gguf_name]}.{j}.weight": w for j, w in enumerate(stacked)}
    for gguf_name, tensor in tensors.items():
        hf_name = hf_names[gguf_name]
        if gguf_name.endswith("_exps.bias"):  # [E, out]: each expert's a row of it
            ready |= {hf_name.format(e): bias for e, bias in enumerate(torch.from_numpy(_dense(tensor)).to(dtype))}
            continue
        if gguf_name.endswith("_exps.weight"):  # [E, out, in]: each expert a view of it
            for part, rows in _expert_rows(tensor, hf_name):
                if tensor.kind.name in KEPT_KINDS and dtype == torch.float32:
                    quantized |= _expert_blocks(tensor, part, rows)
                    on_read |= _expert_floats(tensor, part, rows)
                else:
                    experts = torch.from_numpy(_dense(tensor)[:, rows]).to(dtype)
                    ready |= {part.format(e): expert for e, expert in enumerate(experts)}
            continue
        rows = row_order(config, hf_name)
        dense = functools.cache(functools.partial(_dense_weight, tensor, hf_name, rows, dtype))
        shape = tuple(tensor.shape)
        if tensor.kind.name in KEPT_KINDS and len(shape) == 2 and dtype == torch.float32:
            blocks = tensor.data.reshape(shape[0], -1)  # [out, row bytes]
            blocks = blocks[rows] if rows is not None else blocks
            quantized[hf_name] = QuantizedWeight(tensor.kind.name, _mapped(blocks), shape[1])
            on_read[hf_name] = (shape, dense)
        else:
            ready[hf_name] = dense()
        parts = fused_parts(config, hf_name)
        if parts:  # each part a view of the fused rows, under its own name; the fused name goes
            ready.pop(hf_name, None)
            on_read.pop(hf_name, None)
            whole = quantized.pop(hf_name, None)
            for part, rows in parts:
                on_read[part] = ((row_count(rows), *shape[1:]), functools.partial(_rows, dense, rows))
                if whole is not None:
                    quantized[part] = QuantizedWeight(whole.kind, take_rows(whole.blocks, rows), whole.in_features)
    weights = WeightsOnRead(ready, on_read)
    check_weights(config, weights.shapes(), path)
    return weights, quantized


def _expert_rows(tensor: GGUFTensor, hf_name: str) -> list[tuple[str, slice]]:
    """The projections a stacked expert tensor holds, as (each expert's name with {} for its number, their rows):
    all of its rows, or for Gemma 4's gate and up in one, w1's half and w3's."""
    if not hf_name.endswith("w1+w3.weight"):
        return [(hf_name, slice(None))]
    half = tensor.shape[1] // 2
    return [(hf_name.replace("w1+w3", "w1"), slice(0, half)), (hf_name.replace("w1+w3", "w3"), slice(half, None))]


def _expert_blocks(tensor: GGUFTensor, hf_name: str, rows: slice) -> dict[str, QuantizedWeight]:
    """Stacked experts [E, out, in] of a kept kind as each expert's blocks (`rows` of them), views of the mapped
    file."""
    experts, out, inputs = tensor.shape
    blocks = _mapped(tensor.data.reshape(experts, out, -1))  # [E, out, row bytes]
    return {hf_name.format(e): QuantizedWeight(tensor.kind.name, blocks[e, rows], inputs) for e in range(experts)}


def _expert_floats(tensor: GGUFTensor, hf_name: str, rows: slice) -> dict[str, tuple[tuple[int, ...], Callable]]:
    """Each expert's floats, made only if read: the whole tensor dequantized once, each expert a view of it."""
    whole = functools.cache(lambda: torch.from_numpy(_dense(tensor)))  # [E, out, in] fp32
    shape = (len(range(tensor.shape[1])[rows]), tensor.shape[2])
    return {hf_name.format(e): (shape, functools.partial(_expert, whole, e, rows)) for e in range(tensor.shape[0])}


def _expert(whole: Callable[[], torch.Tensor], e: int, rows: slice) -> torch.Tensor:
    return whole()[e, rows]


def _dense_weight(tensor: GGUFTensor, hf_name: str, rows: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor:
    """The tensor dequantized, llama.cpp's rearrangements undone (gguf_layouts.py): its rows put back in Hugging
    Face's order, its values restored."""
    values = _dense(tensor)
    values = values[rows] if rows is not None else values
    return torch.from_numpy(np.ascontiguousarray(restore_values(hf_name, values))).to(dtype)


def _prediction_block(gguf_name: str, num_layers: int) -> bool:
    """A tensor of a multi-token prediction block (Qwen3.5's `nextn` layers follow the model's own), not served."""
    parts = gguf_name.split(".", 2)
    return len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) >= num_layers


def _rows(whole: Callable[[], torch.Tensor], rows: slice | np.ndarray) -> torch.Tensor:
    return take_rows(whole(), rows)


def _mapped(blocks: np.ndarray) -> torch.Tensor:
    """Blocks as a tensor over the same memory: the file's mapped pages themselves (no copy, so loading never holds
    the file twice, and an embedding's blocks are in memory only where its rows are read), read-only as the map is.
    Nothing writes blocks: packing and slicing make new tensors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(blocks)


def _open(path: Path) -> GGUFFile:
    """The parsed file; every tensor's data is bounds-checked while parsing, so a truncated file fails here."""
    try:
        return read_gguf(path)
    except CorruptGGUF as e:
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF file: {e}") from e
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read GGUF file: {describe(e)}") from e


def _check_type(path: Path, tensor: GGUFTensor) -> None:
    if tensor.kind not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name} has unsupported quantization type {tensor.kind.name} "
            f"(supported: {_SUPPORTED_NAMES})"
        )


def _hf_name(path: Path, gguf_name: str, layer_names: dict[str, str]) -> str:
    """The tensor's Hugging Face name; for a layer's stacked experts, the name of each with {} for its number."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)  # blk.{i}.{rest}
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        if parts[2] in layer_names:
            return f"model.layers.{parts[1]}.{layer_names[parts[2]]}"
        if parts[2] in _EXPERT_NAMES:
            return f"model.layers.{parts[1]}.block_sparse_moe.experts.{{}}.{_EXPERT_NAMES[parts[2]]}"
    raise ModelLoadError(f"{path}: unexpected tensor {gguf_name} (not part of a {_ARCH_NAMES} graph)")


def _dense(tensor: GGUFTensor) -> np.ndarray:
    """The tensor as float32 in numpy (row-major, HF) order, in memory of its own (not the mapped file's)."""
    return dequantize(tensor.data, tensor.kind, tensor.shape)
