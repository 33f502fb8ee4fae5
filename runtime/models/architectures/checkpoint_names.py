"""A checkpoint's tensors as the graph reads them: names mapped to the graph's, fused and stacked tensors in parts.

Checkpoints of one graph name and pack their tensors differently (a multimodal model's prefixes, Qwen's and
gpt-oss's experts, Phi-3's fused projections, Qwen3-Next's fused DeltaNet rows, Gemma 4's stacked experts); the
loaders map them here so the graph, tensor parallel and the fusion passes see one name per tensor."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sagellm.runtime.models.architectures.audio_weights import AUDIO_PREFIXES, audio_name
from sagellm.runtime.models.architectures.vision_weights import VISION_PREFIXES, vision_name
from sagellm.runtime.models.config import ModelConfig

_QWEN_EXPERTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}  # Qwen's expert projections, Mixtral's names


# a multimodal checkpoint's text model
_LANGUAGE_MODEL = {"language_model.model.": "model.", "model.language_model.": "model.",
                   "language_model.lm_head.": "lm_head.", "model.text_model.": "model."}  # fmt: skip


def canonical_name(config: ModelConfig, name: str) -> str | None:
    """The name the graph reads for a checkpoint's tensor, None for one it does not read: a multimodal checkpoint's
    text model drops its prefix (`language_model.model.` in transformers 4, `model.language_model.` in 5,
    Idefics3's `model.text_model.`); its vision tower and projector are read only by a model with a vision encoder
    (`config.vision`: their names are vision_weights.py's), its audio tower only by one with an audio encoder, else
    dropped; Qwen's mixture of experts (`mlp.gate`, `mlp.experts.{e}.gate_proj`, ...) takes Mixtral's names
    (`block_sparse_moe.gate`, `...experts.{e}.w1`), as llama.cpp gives both the same GGUF names; every other name is
    already the graph's."""
    if config.vision is not None and name.startswith(VISION_PREFIXES):
        return vision_name(config.vision, name)
    if config.audio is not None and name.startswith(AUDIO_PREFIXES):
        return audio_name(name)
    for prefix, replacement in _LANGUAGE_MODEL.items():
        if name.startswith(prefix):
            name = replacement + name.removeprefix(prefix)
            break
    else:
        if name.startswith(
            (
                "vision_tower.",
                "multi_modal_projector.",
                "model.vision_tower.",
                "model.multi_modal",
                "audio_tower.",
                "model.audio_tower.",
                "model.embed_vision.",
                "model.embed_audio.",
                "model.visual.",
                "model.vision_model.",
                "model.connector.",
                "mtp.",
            )
        ):  # a vision tower; Qwen3.5's multi-token prediction head
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
