"""Tensor parallelism as a pass over the decoder graph: the graph one rank of `world_size` runs.

Megatron's split of a Llama-family layer, so each layer costs two all-reduces and nothing else:

    q, k, v, gate, up   column-parallel: the rank computes its slice of the output features
    o_proj, down_proj   row-parallel: the rank reads its slice of the input features; an all-reduce sums the parts
    lm_head             vocabulary-parallel: the rank computes its slice of the logits; an all-gather joins them
    embedding, norms    whole on every rank (small; the residual stream stays whole)
    moe                 expert-parallel: the rank holds whole experts, a contiguous share; the router stays whole,
                        so every rank routes every token alike and computes its experts' part; an all-reduce sums

Attention heads go to ranks in whole GQA groups (a KV head with the query heads reading it), contiguous and as even
as can be: SmolLM2-135M's 3 KV heads over 2 ranks are 2 + 1, its 9 query heads 6 + 3. Each rank's paged cache holds
only its KV heads. A mixture of experts' MLP is always split by whole experts (vLLM's `--enable-expert-parallel`
over the tensor parallel group), never each expert by its features as vLLM does without that flag: a rank streams
only its own experts' weights, and its `moe` node's `experts` parameter, `(first, end)`, says which. A linear's
slice is its `shard` parameter, `(dim, start, stop)` of its weight; lowering cuts both, and the fusion passes keep
one slice per fused weight. The pass runs on the unfused graph, before `optimize`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sagellm.common.errors import InvalidInput
from sagellm.runtime.execution_graph.graph import Edge, Graph, Value
from sagellm.runtime.models.config import ModelConfig


@dataclass(frozen=True)
class TensorShard:
    """Which rank of how many this process is."""

    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not one of {self.world_size} tensor parallel ranks")


def partition(n: int, parts: int, index: int) -> tuple[int, int]:
    """The `index`-th of `parts` contiguous ranges covering range(n), sizes differing by at most one."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class RankSlices:
    """What one rank holds, in units of the dimension each names."""

    kv_heads: tuple[int, int]
    kv_head_counts: tuple[int, ...]  # every rank's number of KV heads, in rank order
    heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab_sizes: tuple[int, ...]  # every rank's share of the vocabulary, in rank order
    vocab: tuple[int, int]
    experts: tuple[int, int]  # (0, 0) for a dense model


def rank_slices(config: ModelConfig, shard: TensorShard) -> RankSlices:
    rank, world = shard.rank, shard.world_size
    if config.num_kv_heads < world:
        raise InvalidInput(
            f"tensor parallel size {world} is more than the model's {config.num_kv_heads} KV heads: "
            f"each rank needs at least one KV head; use at most {config.num_kv_heads}"
        )
    kv = partition(config.num_kv_heads, world, rank)
    group = config.kv_heads_per_group
    if config.num_experts and config.num_experts < world:
        raise InvalidInput(
            f"tensor parallel size {world} is more than the model's {config.num_experts} experts: expert parallel "
            f"gives each rank at least one; use at most {config.num_experts}"
        )
    vocab_sizes = tuple(b - a for a, b in (partition(config.vocab_size, world, r) for r in range(world)))
    kv_counts = tuple(b - a for a, b in (partition(config.num_kv_heads, world, r) for r in range(world)))
    return RankSlices(
        kv_heads=kv,
        kv_head_counts=kv_counts,
        heads=(kv[0] * group, kv[1] * group),
        intermediate=partition(config.intermediate_size, world, rank),
        vocab_sizes=vocab_sizes,
        vocab=partition(config.vocab_size, world, rank),
        experts=partition(config.num_experts, world, rank),
    )


def rank_config(config: ModelConfig, shard: TensorShard | None) -> ModelConfig:
    """The config as one rank's attention and KV cache see it: its own query and KV heads."""
    if shard is None or shard.world_size == 1:
        return config
    s = rank_slices(config, shard)
    return dataclasses.replace(config, num_heads=s.heads[1] - s.heads[0], num_kv_heads=s.kv_heads[1] - s.kv_heads[0])


def shard_tensor_parallel(graph: Graph, config: ModelConfig, shard: TensorShard) -> Graph:
    if shard.world_size == 1:
        return graph
    if config.num_linear_layers:
        raise InvalidInput("tensor parallel: Gated DeltaNet layers (Qwen3.5) are not split between ranks yet")
    g = graph.copy()
    s = rank_slices(config, shard)
    d = config.head_dim
    column = {  # weight role -> (first, end) of its output features on this rank
        "self_attn.q_proj.weight": (s.heads[0] * d, s.heads[1] * d),
        "self_attn.k_proj.weight": (s.kv_heads[0] * d, s.kv_heads[1] * d),
        "self_attn.v_proj.weight": (s.kv_heads[0] * d, s.kv_heads[1] * d),
        "mlp.gate_proj.weight": s.intermediate,
        "mlp.up_proj.weight": s.intermediate,
    }
    row = {  # weight role -> (first, end) of its input features on this rank
        "self_attn.o_proj.weight": (s.heads[0] * d, s.heads[1] * d),
        "mlp.down_proj.weight": s.intermediate,
    }
    lm_head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    for node in list(g.nodes.values()):
        if node.op in ("rope", "attention"):
            node.params.update(num_heads=s.heads[1] - s.heads[0], num_kv_heads=s.kv_heads[1] - s.kv_heads[0])
        if node.op == "attention" and node.params.get("sinks"):
            node.params["sinks_heads"] = s.heads  # this rank's heads' sinks
        if node.op == "moe":
            node.params["experts"] = s.experts
            _insert_after(g, Value(node.id), "all_reduce")
        if node.op != "linear":
            continue
        weight = node.params["weight"]
        role = weight.split(".", 3)[-1] if weight.startswith("model.layers.") else weight
        if role in column:
            start, stop = column[role]
            node.params.update(out_features=stop - start, shard=(0, start, stop))
        elif role in row:
            if node.params.get("bias"):  # added once to the reduced sum: on rank 0 only (gpt-oss's o_proj)
                node.params["bias"] = shard.rank == 0
            node.params["shard"] = (1, *row[role])
            _insert_after(g, Value(node.id), "all_reduce")
        elif weight == lm_head:
            node.params.update(out_features=s.vocab[1] - s.vocab[0], shard=(0, *s.vocab))
            _insert_after(g, Value(node.id), "all_gather", sizes=list(s.vocab_sizes))
    g.attrs["tensor_parallel"] = (shard.rank, shard.world_size)
    return g


def _insert_after(g: Graph, value: Value, op: str, **params) -> Value:
    """A new node `op(value)` that every former reader of `value` reads instead."""
    readers = [e for e in g.edges if (e.src, e.src_port) == (value.node, value.port)]
    new = g.add(op, [value], **params)
    g.edges = [e for e in g.edges if e not in readers] + [Edge(new.node, e.dst, e.port, 0) for e in readers]
    return new
