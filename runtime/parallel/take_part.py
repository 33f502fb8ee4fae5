"""One rank's part in what rank 0 ordered: a step, or a KV hand-over, for any layout of slices and stages.

Rank 0 passes its own `slots` and `kv`; the others take them from the order and the broadcast. Each rank's own
work is `ModelRunner`'s, called as such: rank 0's runner overrides those methods to give the orders.

    step      a stage after the first receives the hidden state and residual [T, H] from the same slice of the
              stage before and sends its own on; slice 0 of the last stage sends the logits to rank 0. A step's
              media embeddings [M, `media_width`] are broadcast from rank 0.
    read KV   a prompt's KV leaves whole, [layers, 2, n, Hk, D]: a stage's slices join their heads (all-gather,
              each layer's own heads: kv_shares.py), and each stage's slice 0 sends its layers to rank 0, which
              joins them in order.
    write KV  rank 0 broadcasts it whole; every rank stores its layers' heads of it.
    states    a model with recurrent layers: each rank reads, writes or copies its own layers' states, of its
              heads; what leaves is joined whole in each stage (all-gather) and goes to rank 0 stage by stage, what
              comes is broadcast whole and each rank takes its share (state_shares.py).
    LoRA      rank 0 broadcasts the adapter it read, its factors flat; every rank keeps its slice in the slot."""

from __future__ import annotations

from typing import Any

import torch

from sagellm.runtime.engine.model_runner import ModelRunner, StepInputs, cache_config
from sagellm.runtime.engine.state_cache import values_per_state_slot
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.lora_adapter import LoraAdapter
from sagellm.runtime.models.pipeline_stages import PipelineStage
from sagellm.runtime.models.tensor_parallel import TensorShard, rank_config
from sagellm.runtime.parallel.kv_shares import join_kv_shares, kv_share, share_widths
from sagellm.runtime.parallel.layout import RankComms, RankLayout
from sagellm.runtime.parallel.rank_spec import LoadLora, ReadKV, ReadStates, WriteKV, WriteStates
from sagellm.runtime.parallel.state_shares import join_state_shares, state_share

CARRIED = ("hidden", "residual")  # what a layer boundary carries, in the order it is sent


def take_part(
    runner: ModelRunner,
    layout: RankLayout,
    comms: RankComms,
    order: StepInputs | ReadKV | WriteKV | ReadStates | WriteStates | LoadLora,
    slots: torch.Tensor | None = None,
    kv: torch.Tensor | None = None,
    adapter: LoraAdapter | None = None,
    media_embeds: torch.Tensor | None = None,
) -> Any:
    if isinstance(order, StepInputs):
        return _step(runner, layout, comms, order, media_embeds)
    if isinstance(order, LoadLora):
        assert runner.lora is not None
        runner.lora.load(order.slot, _lora_factors(comms, order, adapter), order.lora_rank, order.scaling)
        return None
    if isinstance(order, (ReadStates, WriteStates)):
        return _states(runner, layout, comms, order, kv)
    slots = torch.tensor(order.slots, dtype=torch.int64) if slots is None else slots
    if isinstance(order, ReadKV):
        return _read_kv(runner, layout, comms, slots)
    kv = comms.world.broadcast(torch.empty(order.shape) if kv is None else kv, 0)
    part = kv[stage_kv_rows(runner.config, runner.layers)]
    if layout.shard is not None:
        part = kv_share(part, runner.config, layout.shard, stage_kv_layers(runner.config, runner.layers))
    ModelRunner.write_kv(runner, slots, part)
    return None


def _lora_factors(
    comms: RankComms, order: LoadLora, adapter: LoraAdapter | None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The A and B of each weight the adapter changes, on every rank: rank 0 (which passes the `adapter` it read)
    broadcasts them flat, the others cut them out in the order's shapes."""
    if adapter is not None:
        comms.world.broadcast(torch.cat([t.reshape(-1) for w, _, _ in order.shapes for t in adapter.weights[w]]), 0)
        return adapter.weights
    r = order.lora_rank
    sizes = [size for _, out, into in order.shapes for size in (r * into, out * r)]
    parts = iter(comms.world.broadcast(torch.empty(sum(sizes)), 0).split(sizes))
    return {weight: (next(parts).view(r, into), next(parts).view(out, r)) for weight, out, into in order.shapes}


def _step(
    runner: ModelRunner, layout: RankLayout, comms: RankComms, step: StepInputs, media_embeds: torch.Tensor | None
) -> torch.Tensor | None:
    """The logits on rank 0 (and on every rank of a single stage); None elsewhere. A step with images or audio
    (`step.media_rows`) has rank 0's encoder embeddings (`media_embeds`) broadcast, taken by the first stage."""
    rows, hidden_size = len(step.input_ids), runner.config.hidden_size
    carried = None
    if step.media_rows:  # through the CPU group; rank 0 keeps its own (on its device) for its own stage
        held = media_embeds.float().cpu().contiguous() if media_embeds is not None else None
        width = media_width(runner.config)
        embeds = comms.world.broadcast(held if held is not None else torch.empty(len(step.media_rows), width), 0)
        if layout.previous is None:  # the first stage: its embedding's rows take them
            mm_rows = torch.tensor(step.media_rows, dtype=torch.int64, device=runner.device)
            mine = media_embeds if media_embeds is not None else embeds.to(runner.device)
            carried = {"mm_rows": mm_rows, "mm_embeds": mine}
    if layout.previous is not None:  # through the CPU group: on a GPU, a copy each way
        received = {name: comms.world.recv(torch.empty(rows, hidden_size), layout.previous) for name in CARRIED}
        carried = {name: tensor.to(runner.device) for name, tensor in received.items()}
    out = ModelRunner.forward(runner, step, carried)
    if layout.next is not None:
        for name in CARRIED:
            comms.world.send(out[name].cpu(), layout.next)
    if layout.pp == 1:
        return out["logits"]
    if layout.rank == layout.logits_rank:
        comms.world.send(out["logits"].cpu(), 0)
    if layout.rank == 0:
        sampled = rows if step.logits_rows is None else len(step.logits_rows)
        return comms.world.recv(torch.empty(sampled, runner.config.vocab_size), layout.logits_rank)
    return None


def media_width(config: ModelConfig) -> int:
    """The width of a step's media embeddings, which the ranks that receive them must know beforehand: the text
    model's, or a vision encoder's rows with DeepStack's beside them (Qwen3-VL's)."""
    return config.vision.embedding_width if config.vision is not None else config.hidden_size


def _states(
    runner: ModelRunner,
    layout: RankLayout,
    comms: RankComms,
    order: ReadStates | WriteStates,
    states: torch.Tensor | None,
) -> torch.Tensor | None:
    """A rank's part in a move of recurrent states: its stage's layers, its slice's heads of them."""
    stages = [PipelineStage(i, layout.pp) for i in range(layout.pp)]
    sizes = [stage_states_size(runner.config, stage) for stage in stages]
    mine = layout.rank // layout.tp  # the rank's stage
    whole = cache_config(runner.config, None, stages[mine])  # the stage's layers, every head
    split = layout.shard is not None and sizes[mine] > 0
    if isinstance(order, WriteStates):
        states = comms.world.broadcast(torch.empty(order.size) if states is None else states, 0)
        start = sum(sizes[:mine])
        part = states[start : start + sizes[mine]]
        ModelRunner.write_states(runner, order.slot, state_share(part, whole, layout.shard) if split else part)
        return None
    own = ModelRunner.read_states(runner, order.slot)
    if split:
        counts = [values_per_state_slot(rank_config(whole, TensorShard(s, layout.tp))) for s in range(layout.tp)]
        own = join_state_shares(list(comms.stage.all_gather(own, counts).split(counts)), whole)
    if layout.rank != 0:
        if layout.slice == 0 and sizes[mine]:
            comms.world.send(own.cpu().contiguous(), 0)
        return None
    parts = [own.cpu()]
    parts += [comms.world.recv(torch.empty(sizes[i]), i * layout.tp) for i in range(1, layout.pp) if sizes[i]]
    return torch.cat(parts)


def stage_kv_layers(config: ModelConfig, layers: range) -> list[int]:
    """The layers with a cache of their own among a stage's `layers`, in order."""
    return [i for i in config.kv_layers if i in layers]


def stage_kv_rows(config: ModelConfig, layers: range) -> slice:
    """The rows of a whole model's KV ([KV layers, ...]: layers with a cache of their own) a stage's layers hold."""
    before = sum(1 for i in config.kv_layers if i < layers.start)
    return slice(before, before + len(stage_kv_layers(config, layers)))


def stage_states_size(config: ModelConfig, stage: PipelineStage) -> int:
    """How many state values a stage's linear attention layers hold per slot."""
    return values_per_state_slot(cache_config(config, None, stage))


def _read_kv(runner: ModelRunner, layout: RankLayout, comms: RankComms, slots: torch.Tensor) -> torch.Tensor | None:
    config = runner.config
    mine = ModelRunner.read_kv(runner, slots)  # [stage layers, 2, n, the slice's KV heads, D]
    if layout.shard is not None:  # heads last: the all-gather joins the last dimension
        layers = stage_kv_layers(config, runner.layers)
        widths = share_widths(config, layout.tp, layers)
        gathered = comms.stage.all_gather(mine.movedim(3, -1).contiguous(), widths).movedim(-1, 3)
        mine = join_kv_shares(gathered, config, layout.tp, layers)
    if layout.pp == 1:
        return mine
    if layout.rank != 0:
        if layout.slice == 0:
            comms.world.send(mine.cpu().contiguous(), 0)
        return None
    parts = [mine.cpu()]
    for index in range(1, layout.pp):
        rows = stage_kv_rows(config, PipelineStage(index, layout.pp).layers(config.num_layers))
        layers = rows.stop - rows.start
        shape = (layers, 2, slots.numel(), config.num_kv_heads, config.head_dim)
        parts.append(comms.world.recv(torch.empty(shape), index * layout.tp))
    return torch.cat(parts)
