"""The recurrent states of a model's linear attention layers (Gated DeltaNet): per layer, one convolution window
[S, C, K-1] and one delta-rule state [S, Hv, Dk, Dv], over S state slots.

A running sequence holds one slot (state_slots.py hands them out) for all its layers, as it holds KV blocks for its
attention layers; the prefix cache keeps checkpoints in slots of its own. Memory is taken untouched, as the KV
cache's (kv_cache.py): a slot costs resident memory once a sequence has written it, and a sequence starting at
position 0 never reads its slot, so a freed slot needs no clearing."""

from __future__ import annotations

from functools import partial

import torch

from sagellm.backends.layer_caches import RecurrentStates
from sagellm.runtime.engine.kv_cache import untouched_zeros
from sagellm.runtime.models.config import ModelConfig

StateCaches = list[RecurrentStates]


def bytes_per_state_slot(config: ModelConfig) -> int:
    """One slot's states in every linear attention layer (float32)."""
    return values_per_state_slot(config) * 4


def values_per_state_slot(config: ModelConfig) -> int:
    """One slot's state values in every linear attention layer of `config` (a pipeline stage's or a tensor parallel
    rank's, for its config: its layers, its heads)."""
    conv = config.linear_conv_dim * (config.linear_conv_kernel - 1)
    recurrent = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim
    return config.num_linear_layers * (conv + recurrent)


def allocate_state_caches(config: ModelConfig, num_slots: int, device: torch.device) -> StateCaches:
    """The states of `config`'s linear attention layers (a rank's, for its `cache_config`: its stage's layers, its
    heads)."""
    conv = (num_slots, config.linear_conv_dim, config.linear_conv_kernel - 1)
    recurrent = (num_slots, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim)
    zeros = untouched_zeros if device.type == "cpu" else partial(torch.zeros, device=device)
    return [
        RecurrentStates(zeros(conv, dtype=torch.float32), zeros(recurrent, dtype=torch.float32))
        for _ in range(config.num_linear_layers)
    ]
