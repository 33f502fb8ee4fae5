"""One rank's part in what rank 0 ordered: a step, or a KV hand-over, for any layout of slices and stages.

Rank 0 passes its own `slots` and `kv`; the others take them from the order and the broadcast. Each rank's own
work is `ModelRunner`'s, called as such: rank 0's runner overrides those methods to give the orders.

    step      a stage after the first receives the hidden state and residual [T, H] from the same slice of the
              stage before and sends its own on; slice 0 of the last stage sends the logits to rank 0.
    read KV   a prompt's KV leaves whole, [layers, 2, n, Hk, D]: a stage's slices join their heads (all-gather),
              and each stage's slice 0 sends its layers to rank 0, which joins them in order.
    write KV  rank 0 broadcasts it whole; every rank stores its layers' heads of it."""

from __future__ import annotations

from typing import Any

import torch

from sagellm.runtime.engine.model_runner import ModelRunner, StepInputs
from sagellm.runtime.models.pipeline_stages import PipelineStage
from sagellm.runtime.models.tensor_parallel import rank_slices
from sagellm.runtime.parallel.layout import RankComms, RankLayout
from sagellm.runtime.parallel.rank_spec import ReadKV, WriteKV

CARRIED = ("hidden", "residual")  # what a layer boundary carries, in the order it is sent


def take_part(
    runner: ModelRunner,
    layout: RankLayout,
    comms: RankComms,
    order: StepInputs | ReadKV | WriteKV,
    slots: torch.Tensor | None = None,
    kv: torch.Tensor | None = None,
) -> Any:
    if isinstance(order, StepInputs):
        return _step(runner, layout, comms, order)
    slots = torch.tensor(order.slots, dtype=torch.int64) if slots is None else slots
    if isinstance(order, ReadKV):
        return _read_kv(runner, layout, comms, slots)
    kv = comms.world.broadcast(torch.empty(order.shape) if kv is None else kv, 0)
    part = kv[runner.layers.start : runner.layers.stop]
    if layout.shard is not None:
        first, end = rank_slices(runner.config, layout.shard).kv_heads
        part = part[:, :, :, first:end]
    ModelRunner.write_kv(runner, slots, part)
    return None


def _step(runner: ModelRunner, layout: RankLayout, comms: RankComms, step: StepInputs) -> torch.Tensor | None:
    """The logits on rank 0 (and on every rank of a single stage); None elsewhere."""
    rows, hidden_size = len(step.input_ids), runner.config.hidden_size
    carried = None
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


def _read_kv(runner: ModelRunner, layout: RankLayout, comms: RankComms, slots: torch.Tensor) -> torch.Tensor | None:
    config = runner.config
    mine = ModelRunner.read_kv(runner, slots)  # [stage layers, 2, n, the slice's KV heads, D]
    if layout.shard is not None:  # heads last: the all-gather joins the last dimension
        counts = list(rank_slices(config, layout.shard).kv_head_counts)
        mine = comms.stage.all_gather(mine.movedim(3, -1).contiguous(), counts).movedim(-1, 3)
    if layout.pp == 1:
        return mine
    if layout.rank != 0:
        if layout.slice == 0:
            comms.world.send(mine.cpu().contiguous(), 0)
        return None
    parts = [mine.cpu()]
    for index in range(1, layout.pp):
        layers = len(PipelineStage(index, layout.pp).layers(config.num_layers))
        shape = (layers, 2, slots.numel(), config.num_kv_heads, config.head_dim)
        parts.append(comms.world.recv(torch.empty(shape), index * layout.tp))
    return torch.cat(parts)
