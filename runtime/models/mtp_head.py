"""Qwen3.5's and Qwen3-Next's multi-token prediction (MTP) head, what vLLM's `{"method": "mtp"}` proposer runs.

The checkpoint holds it beside the model under `mtp.`: `fc` joins a token's normed embedding with the model's final
hidden state at the position before it ([2H] -> [H]; `pre_fc_norm_embedding`, `pre_fc_norm_hidden`), one decoder
layer of the model's kind with full attention (`mtp.layers.0.`) and a final `norm`; the embeddings and the lm_head
are the model's. So the head is run as a one-layer model of its own (`head_config`), its layer's weights under the
names layer 0 of such a model reads, its graph `decoder_graph.build_mtp_graph`. Its norms are stored as offsets from
1 like the model's (the loader turns them into the weights themselves)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from sagellm.runtime.models.architectures.weight_shapes import expected_weight_shapes
from sagellm.runtime.models.config import ModelConfig

PREFIX = "mtp."
SHARED_WEIGHTS = ("model.embed_tokens.weight", "lm_head.weight")  # the model's, which the head reads too
_LAYER = "mtp.layers.0."
HEAD_NORMS = frozenset(f"{PREFIX}{norm}.weight" for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"))


def head_config(config: ModelConfig) -> ModelConfig:
    """The head as a model: one full attention layer of `config`'s kind."""
    return dataclasses.replace(config, num_layers=1, layer_types=("full_attention",), num_mtp_layers=0)


def with_head_layer(config: ModelConfig) -> ModelConfig:
    """The model with the head's layer after its own: what its KV cache and the head's take together."""
    return dataclasses.replace(
        config, num_layers=config.num_layers + 1, layer_types=(*config.layer_types, "full_attention")
    )


def head_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The head's own tensors under the checkpoint's names (the layer's canonicalized as the model's are)."""
    h = config.hidden_size
    one_layer = expected_weight_shapes(head_config(config))
    layer = {_LAYER + name.removeprefix("model.layers.0."): shape for name, shape in one_layer.items()
             if name.startswith("model.layers.0.")}  # fmt: skip
    return layer | {f"{PREFIX}fc.weight": (h, 2 * h)} | {norm: (h,) for norm in HEAD_NORMS}


def head_weights(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights `build_mtp_graph` reads, out of the model's loaded with its head: the head's layer as layer 0,
    its own tensors, and the model's embeddings and lm_head (the same tensors, not copies)."""
    shared = {name: weights[name] for name in SHARED_WEIGHTS if name in weights}
    layer = {"model.layers.0." + name.removeprefix(_LAYER): t for name, t in weights.items() if name.startswith(_LAYER)}
    own = {name: t for name, t in weights.items() if name.startswith(PREFIX) and not name.startswith(_LAYER)}
    return shared | layer | own


def is_head_weight(name: str) -> bool:
    return name.startswith(PREFIX)
