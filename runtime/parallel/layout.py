"""Who is who in an engine's group of processes: `tp` tensor parallel ranks in each of `pp` pipeline stages.

Rank r is slice `r % tp` of stage `r // tp`; rank 0 (stage 0, slice 0) runs the scheduler. Each stage's slices talk
through their own communicator (the all-reduces inside its layers); the whole group through another: rank 0's
orders, the hidden state from a slice to the same slice of the next stage, the logits from the last stage's slice
0 back to rank 0. With one stage the two are one communicator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from sagellm.runtime.comm.collectives import DEFAULT_TIMEOUT_S, Communicator
from sagellm.runtime.comm.shared_collectives import SharedCollectives
from sagellm.runtime.models.pipeline_stages import PipelineStage
from sagellm.runtime.models.tensor_parallel import TensorShard
from sagellm.runtime.parallel.rank_spec import RankSpec

IDLE_TIMEOUT_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class RankLayout:
    tp: int
    pp: int
    rank: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def slice(self) -> int:
        return self.rank % self.tp

    @property
    def shard(self) -> TensorShard | None:
        return TensorShard(self.slice, self.tp) if self.tp > 1 else None

    @property
    def stage(self) -> PipelineStage | None:
        return PipelineStage(self.rank // self.tp, self.pp) if self.pp > 1 else None

    @property
    def previous(self) -> int | None:
        """The same slice of the stage before, which sends this rank its hidden state."""
        return self.rank - self.tp if self.rank >= self.tp else None

    @property
    def next(self) -> int | None:
        return self.rank + self.tp if self.rank + self.tp < self.world_size else None

    @property
    def logits_rank(self) -> int:
        """The rank that sends the logits to rank 0: slice 0 of the last stage."""
        return (self.pp - 1) * self.tp


@dataclass
class RankComms:
    """A rank's two communicators: the group's on the CPU (gloo, through shared memory on one host: rank 0's orders,
    what crosses stages), and its stage's in the devices' own library (the all-reduces); one object when there is one
    stage on the CPU. `stage` is None without tensor parallel.

    Waiting for orders has no time limit through shared memory (an idle engine's ranks wait for its next step);
    without it the group's process group gets a long one, since gloo notices a peer that is gone at once anyway."""

    world: Communicator
    stage: Communicator | None

    @classmethod
    def open(cls, layout: RankLayout, store: Any, library: str, spec: RankSpec) -> RankComms:
        """The rank's communicators over the group's store, through the shared memory segments `spec` names."""
        world_shared = stage_shared = None
        if spec.world_fd is not None:
            world_shared = SharedCollectives(spec.world_fd, layout.rank, layout.world_size, spec.world_capacity)
        if spec.stage_fds:
            fd = spec.stage_fds[layout.rank // layout.tp]
            stage_shared = SharedCollectives(fd, layout.slice, layout.tp, spec.stage_capacity)
        timeout = DEFAULT_TIMEOUT_S if world_shared is not None else IDLE_TIMEOUT_S
        world = Communicator(layout.rank, layout.world_size, store, shared=world_shared, timeout_s=timeout)
        if layout.tp == 1:
            return cls(world, None)
        if layout.pp == 1 and library == world.library:
            return cls(world, world)
        prefix = dist.PrefixStore(f"stage{layout.rank // layout.tp}/", store)
        return cls(world, Communicator(layout.slice, layout.tp, prefix, library=library, shared=stage_shared))

    def connect(self) -> None:
        self.world.connect()
        if self.stage is not None and self.stage is not self.world:
            self.stage.connect()

    def close(self) -> None:
        if self.stage is not None and self.stage is not self.world:
            self.stage.close()
        self.world.close()
