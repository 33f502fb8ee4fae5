"""Tensor parallelism as a pass over the decoder graph: the graph one rank of `world_size` runs.

Megatron's split of a Llama-family layer, so each layer costs two all-reduces and nothing else:

    q, k, v, gate, up   column-parallel: the rank computes its slice of the output features
    o_proj, down_proj   row-parallel: the rank reads its slice of the input features; an all-reduce sums the parts
    lm_head             vocabulary-parallel: the rank computes its slice of the logits; an all-gather joins them
    embedding, norms    whole on every rank (small; the residual stream stays whole)
    moe                 expert-parallel: the rank holds whole experts, a contiguous share; the router stays whole,
                        so every rank routes every token alike and computes its experts' part; an all-reduce sums
    Gated DeltaNet      by heads, as vLLM splits Qwen3-Next's and Qwen3.5's: the rank holds a contiguous share of the
                        key heads and the value heads reading them, so its delta rule runs on its own; in_proj_qkv
                        (its q, k and v rows), z, b and a column-parallel, the convolution's channels, A_log and
                        dt_bias the same heads', the gated norm per head (local), out_proj row-parallel

Attention heads go to ranks in whole GQA groups (a KV head with the query heads reading it), contiguous and as even
as can be: SmolLM2-135M's 3 KV heads over 2 ranks are 2 + 1, its 9 query heads 6 + 3. Each rank's paged cache holds
only its KV heads. A mixture of experts' MLP is always split by whole experts (vLLM's `--enable-expert-parallel`
over the tensor parallel group), never each expert by its features as vLLM does without that flag: a rank streams
only its own experts' weights, and its `moe` node's `experts` parameter, `(first, end)`, says which. Qwen3.5's gated
attention keeps each head's query and gate together: q_proj's rows are cut by whole heads of both.

The groups are each layer's own: Gemma 4's full attention layers have heads of another size and a KV head count of
their own, so a rank's query heads may differ from layer to layer (6 query heads over 3 sliding KV heads are 4 + 2,
over 2 full ones 3 + 3). A layer reading an earlier layer's KV (Gemma 4's and 3n's last ones) is of that layer's
kind, so it is split the same way and reads the rank's own cache of it. MLPs are cut by each layer's width (Gemma
3n's per layer, Gemma 4's double-wide ones); Gemma 3n's activation sparsity takes the mean and deviation of the
whole row, so its node keeps the row's `width` and lowering sums the ranks' parts. Per-layer embeddings and their
projections, layer scalars, AltUp and LAuReL act on the residual stream: whole on every rank.

A Gated DeltaNet's key heads split as evenly as can be, as KV heads do, and each rank's recurrent states hold only
its heads. Its value heads are grouped by key head (Hugging Face's order: value head h reads key head h // r,
r = Hv / Hk) or tiled (a GGUF's: h % Hk): a rank with key heads [k0, k1) holds value heads [k0 r, k1 r), or the r
runs t Hk + [k0, k1), which stay tiled among themselves (its value head j reads its key head j % (k1 - k0)).

A linear's slice is its `shard` parameter, `(dim, start, stop)` of its weight, or several runs `(dim, start, stop,
start, stop, ...)` joined in order (a DeltaNet's q, k and v rows, or tiled value heads); lowering cuts both, and the
fusion passes keep one slice per fused weight. The pass runs on the unfused graph, before `optimize`."""

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


Runs = tuple[tuple[int, int], ...]  # ranges [start, stop) of a dimension, joined in order


@dataclass(frozen=True)
class HeadSlices:
    """One attention layer's heads a rank holds: whole GQA groups, a KV head with the query heads reading it."""

    kv_heads: tuple[int, int]
    heads: tuple[int, int]


@dataclass(frozen=True)
class RankSlices:
    """What one rank holds, in units of the dimension each names."""

    attention: tuple[HeadSlices, ...]  # each layer's heads (a linear attention layer's: unused)
    intermediate: tuple[tuple[int, int], ...]  # each layer's MLP features
    vocab_sizes: tuple[int, ...]  # every rank's share of the vocabulary, in rank order
    vocab: tuple[int, int]
    experts: tuple[int, int]  # (0, 0) for a dense model
    linear_key_heads: tuple[int, int]  # a Gated DeltaNet's key heads ((0, 0) without one)
    linear_value_heads: Runs  # the value heads reading them: one run, or one per tile (a GGUF's order)
    linear_channels: Runs  # the convolution's channels, in_proj_qkv's rows: the key heads' q and k, the value heads' v


def rank_slices(config: ModelConfig, shard: TensorShard) -> RankSlices:
    rank, world = shard.rank, shard.world_size
    if config.num_experts and config.num_experts < world:
        raise InvalidInput(
            f"tensor parallel size {world} is more than the model's {config.num_experts} experts: expert parallel "
            f"gives each rank at least one; use at most {config.num_experts}"
        )
    layers = range(config.num_layers)
    kinds = {n: _head_slices(config, n, shard) for n in sorted({config.num_kv_heads_of(i) for i in layers})}
    vocab_sizes = tuple(b - a for a, b in (partition(config.vocab_size, world, r) for r in range(world)))
    return RankSlices(
        attention=tuple(kinds[config.num_kv_heads_of(i)] for i in layers),
        intermediate=tuple(partition(config.intermediate_size_of(i), world, rank) for i in layers),
        vocab_sizes=vocab_sizes,
        vocab=partition(config.vocab_size, world, rank),
        experts=partition(config.num_experts, world, rank),
        **_linear_attention_slices(config, shard),
    )


def _head_slices(config: ModelConfig, num_kv_heads: int, shard: TensorShard) -> HeadSlices:
    """The heads a rank holds of a layer with `num_kv_heads` (the model's, or Gemma 4's full attention layers')."""
    world = shard.world_size
    if num_kv_heads < world:
        which = " of its full attention layers" if num_kv_heads != config.num_kv_heads else ""
        raise InvalidInput(
            f"tensor parallel size {world} is more than the model's {num_kv_heads} KV heads{which}: "
            f"each rank needs at least one KV head; use at most {num_kv_heads}"
        )
    first, end = partition(num_kv_heads, world, shard.rank)
    group = config.num_heads // num_kv_heads
    return HeadSlices(kv_heads=(first, end), heads=(first * group, end * group))


def _linear_attention_slices(config: ModelConfig, shard: TensorShard) -> dict[str, tuple]:
    """RankSlices' Gated DeltaNet fields: whole key heads, with the value heads that read them."""
    hk, world = config.linear_num_key_heads, shard.world_size
    if not config.num_linear_layers:
        return {"linear_key_heads": (0, 0), "linear_value_heads": (), "linear_channels": ()}
    if hk < world:
        raise InvalidInput(
            f"tensor parallel size {world} is more than the model's {hk} linear attention (Gated DeltaNet) key "
            f"heads: each rank needs at least one, with the value heads that read it; use at most {hk}"
        )
    first, end = partition(hk, world, shard.rank)
    r = config.linear_num_value_heads // hk
    if config.linear_value_heads_tiled:
        heads = tuple((t * hk + first, t * hk + end) for t in range(r))
    else:
        heads = ((first * r, end * r),)
    keys, dk = hk * config.linear_key_head_dim, config.linear_key_head_dim
    values = scaled(heads, config.linear_value_head_dim, offset=2 * keys)
    channels = ((first * dk, end * dk), (keys + first * dk, keys + end * dk), *values)
    return {
        "linear_key_heads": (first, end),
        "linear_value_heads": _joined(heads),
        "linear_channels": _joined(channels),
    }


def scaled(runs: Runs, size: int, offset: int = 0) -> Runs:
    """Runs of units of `size` (heads) as runs of what they hold (rows), from `offset` on."""
    return tuple((offset + start * size, offset + stop * size) for start, stop in runs)


def run_length(runs: Runs) -> int:
    """How many units `runs` cover together."""
    return sum(stop - start for start, stop in runs)


def _joined(runs: Runs) -> Runs:
    """`runs` with each one that starts where the one before stops joined to it."""
    out: list[tuple[int, int]] = []
    for start, stop in runs:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return tuple(out)


def rank_config(config: ModelConfig, shard: TensorShard | None) -> ModelConfig:
    """The config as one rank's KV cache and recurrent states see it: its own KV heads of each layer (Gemma 4's full
    attention layers' count apart), and linear attention key and value heads. Its query heads are those of the
    layers with the model's KV head count (another count's layers have their own: `rank_slices`)."""
    if shard is None or shard.world_size == 1:
        return config
    s = rank_slices(config, shard)
    kv = _head_slices(config, config.num_kv_heads, shard)
    full = _head_slices(config, config.full_num_kv_heads, shard) if config.full_num_kv_heads else None
    return dataclasses.replace(
        config,
        num_heads=kv.heads[1] - kv.heads[0],
        num_kv_heads=kv.kv_heads[1] - kv.kv_heads[0],
        full_num_kv_heads=full.kv_heads[1] - full.kv_heads[0] if full else 0,
        linear_num_key_heads=s.linear_key_heads[1] - s.linear_key_heads[0],
        linear_num_value_heads=run_length(s.linear_value_heads),
    )


def shard_tensor_parallel(graph: Graph, config: ModelConfig, shard: TensorShard) -> Graph:
    if shard.world_size == 1:
        return graph
    g = graph.copy()
    s = rank_slices(config, shard)
    roles = [_column_and_row(config, s, i) for i in range(config.num_layers)]
    lm_head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    for node in list(g.nodes.values()):
        if node.op in ("rope", "rope_query", "attention"):
            heads = s.attention[node.params["layer"]]
            node.params["num_heads"] = heads.heads[1] - heads.heads[0]
            if node.op != "rope_query":
                node.params["num_kv_heads"] = heads.kv_heads[1] - heads.kv_heads[0]
            if node.params.get("sinks"):
                node.params["sinks_heads"] = heads.heads  # this rank's heads' sinks
        if node.op == "gaussian_top_k":  # the whole row's mean and deviation: lowering sums the ranks' parts
            node.params["width"] = config.intermediate_size_of(node.params["layer"])
        if node.op == "gated_delta_net":  # lowering cuts its convolution, A_log and dt_bias to these
            first, end = s.linear_key_heads
            node.params.update(num_k_heads=end - first, value_heads=s.linear_value_heads, channels=s.linear_channels)
        if node.op == "moe":
            node.params["experts"] = s.experts
            _insert_after(g, Value(node.id), "all_reduce")
        if node.op != "linear":
            continue
        weight = role = node.params["weight"]
        column, row = {}, {}
        if weight.startswith("model.layers."):  # model.layers.<i>.<role>
            _, _, layer, role = weight.split(".", 3)
            column, row = roles[int(layer)]
        if role in column:
            runs = column[role]
            node.params.update(out_features=run_length(runs), shard=_shard(0, runs))
        elif role in row:
            if node.params.get("bias"):  # added once to the reduced sum: on rank 0 only (gpt-oss's o_proj)
                node.params["bias"] = shard.rank == 0
            node.params["shard"] = _shard(1, row[role])
            _insert_after(g, Value(node.id), "all_reduce")
        elif weight == lm_head:
            node.params.update(out_features=s.vocab[1] - s.vocab[0], shard=(0, *s.vocab))
            _insert_after(g, Value(node.id), "all_gather", sizes=list(s.vocab_sizes))
    g.attrs["tensor_parallel"] = (shard.rank, shard.world_size)
    return g


def _column_and_row(config: ModelConfig, s: RankSlices, layer: int) -> tuple[dict[str, Runs], dict[str, Runs]]:
    """Weight role in `layer` -> the runs of its output features this rank computes (column-parallel), and of its
    input features it reads (row-parallel): the layer's own heads, of its own size, and its MLP's width."""
    d, attention, intermediate = config.head_dim_of(layer), s.attention[layer], s.intermediate[layer]
    q = 2 * d if config.attn_output_gate else d  # a gated head's query, then its gate (Qwen3.5)
    heads, kv = (attention.heads,), (attention.kv_heads,)
    column = {
        "self_attn.q_proj.weight": scaled(heads, q),
        "self_attn.k_proj.weight": scaled(kv, d),
        "self_attn.v_proj.weight": scaled(kv, d),
        "mlp.gate_proj.weight": (intermediate,),
        "mlp.up_proj.weight": (intermediate,),
    }
    row = {"self_attn.o_proj.weight": scaled(heads, d), "mlp.down_proj.weight": (intermediate,)}
    if config.num_linear_layers:
        values = scaled(s.linear_value_heads, config.linear_value_head_dim)
        column |= {
            "linear_attn.in_proj_qkv.weight": s.linear_channels,
            "linear_attn.in_proj_z.weight": values,
            "linear_attn.in_proj_b.weight": s.linear_value_heads,
            "linear_attn.in_proj_a.weight": s.linear_value_heads,
        }
        row["linear_attn.out_proj.weight"] = values
    return column, row


def _shard(dim: int, runs: Runs) -> tuple[int, ...]:
    """A linear's `shard` parameter: (dim, start, stop, start, stop, ...)."""
    return (dim, *(bound for run in runs for bound in run))


def _insert_after(g: Graph, value: Value, op: str, **params) -> Value:
    """A new node `op(value)` that every former reader of `value` reads instead."""
    readers = [e for e in g.edges if (e.src, e.src_port) == (value.node, value.port)]
    new = g.add(op, [value], **params)
    g.edges = [e for e in g.edges if e not in readers] + [Edge(new.node, e.dst, e.port, 0) for e in readers]
    return new
