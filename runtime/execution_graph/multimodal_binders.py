"""The binders multimodal models add to lowering's table (lowering.py registers MULTIMODAL_BINDERS): the vision
and audio encoder graphs' ops (models/encoder_graph.py; Gemma 4's tower's: torch_ops/gemma4_vision.py; Qwen3.5's and
Qwen2.5-VL's: torch_ops/qwen_vision.py), the decoder's
`scatter_rows`, which puts the encoder's embeddings into the rows of their placeholder tokens, `add_rows`, which adds
Qwen3-VL's DeepStack columns of them to those rows after its first layers, and `replace_rows`, which gives those
rows another token for Gemma 4's per-layer embeddings.

A binder takes a node's params, the LoweringContext and the backend's kernel table, and gives (kernel, constants
appended after the node's inputs), as lowering's own do. The vision kernels are the backend's (kernel_contracts.py);
the row bookkeeping around them (patches, class rows, scattered rows) is plain torch, as lowering's `index_rows` is.
Norm weights, class and position rows are bound in float32 (the hidden states' dtype) whatever the checkpoint's."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from sagellm.backends.torch_ops import audio, gemma4_vision, qwen_vision, vision
from sagellm.runtime.execution_graph.graph import GraphError


class _Context(Protocol):
    """What these binders read of lowering's LoweringContext (named so, not imported: lowering imports them)."""

    weights: Mapping[str, torch.Tensor]
    backend: Any
    linear_dtype: torch.dtype


def _weight(ctx: _Context, name: str) -> torch.Tensor:
    try:
        return ctx.weights[name]
    except KeyError:
        raise GraphError(f"the encoder graph needs weight {name!r}, which the loaded model lacks") from None


def _float_weight(ctx: _Context, name: str) -> torch.Tensor:
    return _weight(ctx, name).float().to(ctx.backend.device)


def _float_weights(ctx: _Context, *names: str) -> tuple[torch.Tensor, ...]:
    return tuple(_float_weight(ctx, name) for name in names)


def _bind_patch_embed(params, ctx, kernels):
    """A ViT's embeddings: the pictures cut into patches, each through the patch convolution (its weight [D, C, p, p]
    as a linear on [D, C * p * p], packed as the backend packs linears; its bias where `bias`), the class row
    prepended (`class_embedding`, CLIP's; none without) and the position rows added: all of them in order, class
    row first where there is one; Idefics3's numbering of a whole grid's patches where `bucketed_positions`."""
    weight = _weight(ctx, params["weight"]).flatten(1).to(ctx.linear_dtype)  # [D, C * p * p]
    packed = ctx.backend.prepare_linear_weight(weight)
    bias = _float_weight(ctx, params["weight"].removesuffix(".weight") + ".bias") if params.get("bias") else None
    class_row = _float_weight(ctx, params["class_embedding"]) if params.get("class_embedding") else None
    linear, patch_size = kernels["linear"], params["patch_size"]

    def patch_embed(pixel_values, weight, bias, class_row, positions):
        patches = linear(vision.patchify(pixel_values, patch_size), weight, bias)  # [N * P, D]
        return vision.class_and_positions(patches, class_row, positions)  # [N * (P + 1), D]

    positions = _float_weight(ctx, params["position_embedding"])
    if params.get("bucketed_positions"):
        positions = positions[vision.grid_position_ids(params["grid"]).to(positions.device)]  # [P, D]
    return patch_embed, (packed, bias, class_row, positions)


def _bind_transposed_linear(params, ctx, kernels):
    """A matrix stored [in, out] (Gemma 3's projection) as a linear: transposed once, packed as linears are."""
    weight = _weight(ctx, params["weight"]).t().contiguous().to(ctx.linear_dtype)  # [out, in]
    return kernels["linear"], (ctx.backend.prepare_linear_weight(weight), None)


def _bind_gemma4_patch_embed(params, ctx, kernels):
    """Gemma 4's patch embedder on rows of patches and positions (gemma4_vision.patch_embed): its linear packed as
    the backend packs linears, its two position tables in float32."""
    weight = ctx.backend.prepare_linear_weight(_weight(ctx, params["weight"]).to(ctx.linear_dtype))
    linear = kernels["linear"]

    def embed(rows, positions, weight, table):
        return gemma4_vision.patch_embed(rows, linear, weight, table, positions)

    return embed, (weight, _float_weight(ctx, params["table"]))


def _bind_conv_as_linear(params, ctx, kernels):
    """A convolution whose kernel is its whole input (Qwen-VL's Conv3d on one patch's frames) as a linear: its
    weight [D, C, T, p, p] flattened to [D, C * T * p * p], packed as the backend packs linears, with its bias
    where `bias` (Qwen3.5's; Qwen2.5-VL's has none)."""
    weight = _weight(ctx, params["weight"]).flatten(1).to(ctx.linear_dtype)
    bias = _float_weight(ctx, params["weight"].removesuffix(".weight") + ".bias") if params["bias"] else None
    return kernels["linear"], (ctx.backend.prepare_linear_weight(weight), bias)


def _bind_clamp(params, ctx, kernels):
    """A Gemma 4 clipped linear's clamp of its input or output, its bounds (scalars) in float32."""
    return gemma4_vision.clamp, _float_weights(ctx, params["low"], params["high"])


def _bind_layernorm(params, ctx, kernels):
    weight = _float_weight(ctx, params["weight"])
    return kernels["layernorm"], (weight, _float_weight(ctx, params["weight"].removesuffix(".weight") + ".bias"),
                                  params["eps"])  # fmt: skip


def _bind_encoder_attention(params, ctx, kernels):
    """The kernel on q, k, v [T, H * D] seen as heads, its output flat again."""
    attention, d = kernels["encoder_attention"], params["head_dim"]

    def encoder_attention_flat(q, k, v, meta, scale):
        n = q.shape[0]
        return attention(q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, d), meta, scale).reshape(n, -1)

    return encoder_attention_flat, (params["scale"],)


def _bind_conv1d(params, ctx, kernels):
    """A convolution along the rows (an audio tower's), in float32 as the hidden states."""
    bias = _float_weight(ctx, params["weight"].removesuffix(".weight") + ".bias")
    return audio.conv1d_rows, (_float_weight(ctx, params["weight"]), bias, params["stride"])


def _scatter_rows(hidden: torch.Tensor, rows: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
    """hidden [T, H] with rows `rows` [M] int64 replaced by the first H columns of `embeds` [M, >= H] (a new
    tensor; Qwen3-VL's DeepStack columns follow them); hidden itself when the step has no such rows (None)."""
    if rows is None:
        return hidden
    return hidden.index_copy(0, rows, embeds[:, : hidden.shape[-1]].to(hidden.dtype))


def _add_rows(
    hidden: torch.Tensor, rows: torch.Tensor | None, embeds: torch.Tensor | None, first: int, width: int
) -> torch.Tensor:
    """hidden [T, H] with columns [first, first + width) of `embeds` [M, ...] added at rows `rows` [M] (a new
    tensor): a Qwen3-VL DeepStack layer's rows joining a decoder layer's output; hidden itself when the step has no
    such rows."""
    if rows is None:
        return hidden
    return hidden.index_add(0, rows, embeds[:, first : first + width].to(hidden.dtype))


def _replace_rows(ids: torch.Tensor, rows: torch.Tensor | None, token: int) -> torch.Tensor:
    """ids [T] with rows `rows` [M] set to `token` (a new tensor): what Gemma 4's per-layer embedding reads at an
    image's rows (transformers' pad token); ids itself when the step has no such rows."""
    return ids if rows is None else ids.index_fill(0, rows, token)


MULTIMODAL_BINDERS: dict[str, Callable[[dict[str, Any], Any, Any], tuple[Any, tuple]]] = {
    "patch_embed": _bind_patch_embed,
    "layernorm": _bind_layernorm,
    "encoder_attention": _bind_encoder_attention,
    "gelu": lambda p, ctx, k: (k["gelu"], ()),
    "quick_gelu": lambda p, ctx, k: (k["quick_gelu"], ()),
    "drop_class_rows": lambda p, ctx, k: (vision.drop_class_rows, ()),
    "pixel_shuffle": lambda p, ctx, k: (vision.pixel_shuffle, (p["grid"], p["scale_factor"])),
    "pool_squares": lambda p, ctx, k: (vision.pool_squares, (p["grid"], p["side"])),
    "transposed_linear": _bind_transposed_linear,
    "scatter_rows": lambda p, ctx, k: (_scatter_rows, ()),
    "add_rows": lambda p, ctx, k: (_add_rows, (p["first"], p["width"])),
    "conv1d": _bind_conv1d,
    "positioned_rows": lambda p, ctx, k: (audio.positioned_rows, (_float_weight(ctx, p["positions"]),)),
    "pool_row_pairs": lambda p, ctx, k: (audio.pool_row_pairs, ()),
    "patch_positions": lambda p, ctx, k: (gemma4_vision.patch_positions, ()),
    "gemma4_patch_embed": _bind_gemma4_patch_embed,
    "axial_rope": lambda p, ctx, k: (gemma4_vision.axial_rope, (p["head_dim"], p["theta"])),
    "pool_by_positions": lambda p, ctx, k: (gemma4_vision.pool_by_positions, (p["kernel"], p["scale"])),
    "clamp": _bind_clamp,
    "standardize": lambda p, ctx, k: (gemma4_vision.standardize, _float_weights(ctx, p["bias"], p["scale"])),
    "replace_rows": lambda p, ctx, k: (_replace_rows, (p["token"],)),
    "conv_as_linear": _bind_conv_as_linear,
    "grid_positions": lambda p, ctx, k: (qwen_vision.add_grid_positions, (_float_weight(ctx, p["table"]), p["merge"])),
    "grid_rope": lambda p, ctx, k: (qwen_vision.grid_rope, (p["head_dim"], p["theta"], p["merge"])),
    "rotate_heads": lambda p, ctx, k: (qwen_vision.rotate_heads, (p["head_dim"],)),
    "join_rows": lambda p, ctx, k: (qwen_vision.join_rows, (p["group"],)),
    "window_order": lambda p, ctx, k: (qwen_vision.window_order, (p["merge"], p["side"])),
    "window_metadata": lambda p, ctx, k: (qwen_vision.window_metadata, (p["merge"], p["side"])),
    "window_restore": lambda p, ctx, k: (qwen_vision.window_restore, (p["merge"], p["side"])),
}
