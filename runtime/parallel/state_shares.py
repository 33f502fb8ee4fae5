"""A slot's recurrent states split between a pipeline stage's tensor parallel ranks, and joined again.

A prompt's states travel whole (`ModelRunner.read_states`' layout: every linear attention layer's convolution window
[C, K-1], then its delta-rule state [Hv, Dk, Dv], flat), so an engine split one way hands them to one split another
way. A rank holds its channels of each window and its value heads of each state (tensor_parallel.py's
`linear_channels` and `linear_value_heads`): its share is those rows of every layer's two, in its own layout."""

from __future__ import annotations

import torch

from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.tensor_parallel import Runs, TensorShard, rank_config, rank_slices


def state_share(whole: torch.Tensor, config: ModelConfig, shard: TensorShard) -> torch.Tensor:
    """`shard`'s share of a slot's `whole` states (`config`: its stage's, whole, with linear attention layers), flat
    as its own runner's."""
    s = rank_slices(config, shard)
    channels, heads = _indices(s.linear_channels, whole.device), _indices(s.linear_value_heads, whole.device)
    return torch.cat([t.reshape(-1) for conv, ssm in _layers(whole, config) for t in (conv[channels], ssm[heads])])


def join_state_shares(shares: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """A slot's whole states from every rank's share (`shares`, in rank order; `config`: the stage's, whole)."""
    whole = shares[0].new_empty(sum(share.numel() for share in shares))
    layers = _layers(whole, config)
    for rank, share in enumerate(shares):
        shard = TensorShard(rank, len(shares))
        s = rank_slices(config, shard)
        channels, heads = _indices(s.linear_channels, whole.device), _indices(s.linear_value_heads, whole.device)
        for (conv, ssm), (own_conv, own_ssm) in zip(layers, _layers(share, rank_config(config, shard))):
            conv[channels] = own_conv
            ssm[heads] = own_ssm
    return whole


def _layers(flat: torch.Tensor, config: ModelConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each linear attention layer's window [C, K-1] and state [Hv, Dk * Dv]: views of `flat`."""
    conv = (config.linear_conv_dim, config.linear_conv_kernel - 1)
    ssm = (config.linear_num_value_heads, config.linear_key_head_dim * config.linear_value_head_dim)
    parts = flat.split([conv[0] * conv[1], ssm[0] * ssm[1]] * config.num_linear_layers)
    return [(parts[i].view(conv), parts[i + 1].view(ssm)) for i in range(0, len(parts), 2)]


def _indices(runs: Runs, device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(start, stop, device=device) for start, stop in runs])
