"""A prompt's KV split between a pipeline stage's tensor parallel ranks, and joined again.

KV travels whole, [KV layers, 2, n, Hk, D] in the widest layer's shape, each layer's heads and dimensions first and
zeros after (kv_cache.read_tokens), so an engine split one way hands it to one split another way. A rank holds each
layer's own KV heads (tensor_parallel.py: whole GQA groups of that layer), and its runner reads and writes them in
its own widest shape. Where every layer has as many KV heads, a rank's share is one range of heads of them all; where
layers differ (Gemma 4's full attention layers have a count of their own), each layer's range is its own."""

from __future__ import annotations

import torch

from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.tensor_parallel import TensorShard, rank_slices


def kv_share(kv: torch.Tensor, config: ModelConfig, shard: TensorShard, layers: list[int]) -> torch.Tensor:
    """`shard`'s heads of whole `kv` whose rows are `layers` (layers with a cache of their own; `config`: the whole
    model's), for its runner's `write_kv`: each layer's first, in the rank's widest shape."""
    ranges = _kv_heads(config, shard, layers)
    if len(set(ranges)) == 1:
        first, end = ranges[0]
        return kv[:, :, :, first:end]
    share = kv.new_zeros(*kv.shape[:3], max(end - first for first, end in ranges), kv.shape[4])
    for row, (first, end) in enumerate(ranges):
        share[row, :, :, : end - first] = kv[row, :, :, first:end]
    return share


def share_widths(config: ModelConfig, world_size: int, layers: list[int]) -> list[int]:
    """Each rank's widest KV head count over `layers`, in rank order: the heads of what its runner's `read_kv` gives."""
    shards = [TensorShard(rank, world_size) for rank in range(world_size)]
    return [max(end - first for first, end in _kv_heads(config, shard, layers)) for shard in shards]


def join_kv_shares(gathered: torch.Tensor, config: ModelConfig, world_size: int, layers: list[int]) -> torch.Tensor:
    """The whole KV of `layers` from every rank's `read_kv` joined along the heads (`gathered`: [layers, 2, n, each
    rank's `share_widths` heads in turn, D], as the stage's all-gather gives them)."""
    shards = [TensorShard(rank, world_size) for rank in range(world_size)]
    ranges = [_kv_heads(config, shard, layers) for shard in shards]
    if all(len(set(own)) == 1 for own in ranges):  # each rank's share is one range of every layer: joined already
        return gathered
    heads = max(config.num_kv_heads_of(i) for i in layers)
    whole = gathered.new_zeros(*gathered.shape[:3], heads, gathered.shape[4])
    offset = 0
    for own, width in zip(ranges, share_widths(config, world_size, layers)):
        for row, (first, end) in enumerate(own):
            whole[row, :, :, first:end] = gathered[row, :, :, offset : offset + end - first]
        offset += width
    return whole


def _kv_heads(config: ModelConfig, shard: TensorShard, layers: list[int]) -> list[tuple[int, int]]:
    """The range of each of `layers`' KV heads `shard` holds."""
    s = rank_slices(config, shard)
    return [s.attention[i].kv_heads for i in layers]
