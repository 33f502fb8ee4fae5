"""Rank 0 of a tensor parallel group: the engine's runner, which starts the other ranks and leads every step.

The engine (scheduler, sampler, detokenizer) lives only here. Each step rank 0 broadcasts the step's inputs as
numbers (`StepInputs`, msgpack: data, never code), then every rank runs its slice of the model graph; the all-reduces
inside the graph keep them in lockstep, and the logits' all-gather leaves the whole vocabulary here to sample.

Start-up: rank 0 opens the group's store, starts ranks 1.. as processes (`rank_worker`), prepares its own slice of
the weights while they load theirs, and connects once every rank has said it is ready in the store. A rank that fails
to start says why there; one that dies says it by its exit. A rank lost later fails the next step with
`RunnerLostError`: the engine cannot go on, and whoever runs it (a worker's restart, the user) starts it again."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import structlog
import torch

from sagellm.backends.base import HardwareBackend
from sagellm.common.processes import python_module
from sagellm.common.progress import stage
from sagellm.runtime.comm import shared_collectives
from sagellm.runtime.comm.collectives import CollectiveError, Communicator, open_store
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.model_runner import ModelRunner, RunnerLostError, StepInputs
from sagellm.runtime.engine.placement import place
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.tensor_parallel import TensorShard, rank_slices
from sagellm.runtime.parallel.rank_spec import RankSpec, ReadKV, WriteKV, failed_key, ready_key

log = structlog.get_logger("sagellm.tensor_parallel")
START_TIMEOUT_S = 900.0  # a rank loads the whole model file before it keeps its slice
STOP_TIMEOUT_S = 10.0


class RankStartError(RuntimeError):
    """A rank of the group could not start (its reason, or its exit code)."""


class TensorParallelRunner(ModelRunner):
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        backend: HardwareBackend,
        *,
        engine: EngineConfig,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        quantized: dict[str, Any] | None = None,
    ) -> None:
        world = engine.tensor_parallel_size
        if not engine.model:
            raise ValueError("a tensor parallel engine needs the model's path: every rank loads it")
        place(backend, engine.device_ids, engine.num_threads, 0, world)
        store = open_store(world)
        shared_fd, capacity, shared = None, 0, None
        if backend.collective_library == "gloo" and shared_collectives.supported():
            capacity = _shared_capacity(config, engine)
            shared_fd = shared_collectives.create_segment(world, capacity)
            shared = shared_collectives.SharedCollectives(shared_fd, 0, world, capacity)
        comm = Communicator(0, world, store, library=backend.collective_library, shared=shared)
        spec = RankSpec(
            model=engine.model,
            rank=0,
            world_size=world,
            host=store.host,
            port=store.port,
            backend=backend.name,
            num_blocks=num_blocks,
            block_size=block_size,
            max_model_len=max_model_len,
            quantized_weights=engine.quantized_weights,
            num_threads=engine.num_threads,
            device_ids=engine.device_ids,
            shared_fd=shared_fd,
            shared_capacity=capacity,
        )
        self._ranks: list[subprocess.Popen] = []
        self._comm = comm
        self._encoder = msgspec.msgpack.Encoder()
        try:
            for rank in range(1, world):
                command = python_module(
                    "sagellm.runtime.parallel.rank_worker", msgspec.structs.replace(spec, rank=rank).encode()
                )
                fds = () if shared_fd is None else (shared_fd,)
                self._ranks.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, pass_fds=fds))
            super().__init__(
                config,
                weights,
                backend,
                num_blocks=num_blocks,
                block_size=block_size,
                max_model_len=max_model_len,
                quantized=quantized,
                shard=TensorShard(0, world),
                collectives=comm,
            )
            with stage(f"waiting for {world - 1} more tensor parallel rank(s) to load the model"):
                self._wait_ready(store)
            comm.connect()
        except BaseException:
            self._kill()
            raise
        finally:
            if shared_fd is not None:
                os.close(shared_fd)  # every rank has mapped it or failed
        log.info("tensor_parallel_ready", world_size=world, library=comm.library, threads=torch.get_num_threads())

    def run(self, step: StepInputs) -> torch.Tensor:
        with self._leading(step):
            return super().run(step)

    def read_kv(self, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        with self._leading(ReadKV(slots.tolist())):
            whole = take_part(self, self._comm, ReadKV([]), slots)
        return whole if out is None else out.copy_(whole)

    def write_kv(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        kv = kv.to(torch.float32).contiguous()
        with self._leading(WriteKV(slots.tolist(), list(kv.shape))):
            take_part(self, self._comm, WriteKV([], list(kv.shape)), slots, kv)

    @contextlib.contextmanager
    def _leading(self, order: StepInputs | ReadKV | WriteKV) -> Iterator[None]:
        """Tells the other ranks what to do next, then does rank 0's part; a lost rank ends the runner."""
        try:
            self._comm.broadcast_bytes(self._encoder.encode(order))
            yield
        except CollectiveError as error:
            raise RunnerLostError(f"a tensor parallel rank is gone: {error}") from error

    def close(self) -> None:
        """Tells the ranks to stop (an empty step) and waits for them; a rank that does not stop is killed."""
        if not self._ranks:
            return
        if all(rank.poll() is None for rank in self._ranks):
            with contextlib.suppress(CollectiveError):  # a rank gone meanwhile: the others stop on the error
                self._comm.broadcast_bytes(b"")
        self._comm.close()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for rank in self._ranks:
            try:
                rank.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rank.kill()
                rank.wait()
        self._ranks = []

    def _wait_ready(self, store: Any) -> None:
        pending = set(range(1, len(self._ranks) + 1))
        deadline = time.monotonic() + START_TIMEOUT_S
        while pending:
            for rank in sorted(pending):
                if store.check([failed_key(rank)]):
                    raise RankStartError(
                        f"tensor parallel rank {rank} could not start: {store.get(failed_key(rank)).decode()}"
                    )
                if store.check([ready_key(rank)]):
                    pending.discard(rank)
                elif (code := self._ranks[rank - 1].poll()) is not None:
                    raise RankStartError(f"tensor parallel rank {rank} exited with code {code} while starting")
            if time.monotonic() > deadline:
                raise RankStartError(f"tensor parallel rank(s) {sorted(pending)} not ready in {START_TIMEOUT_S:g} s")
            time.sleep(0.05)

    def _kill(self) -> None:
        for rank in self._ranks:
            rank.kill()
            rank.wait()
        self._ranks = []


def _shared_capacity(config: ModelConfig, engine: EngineConfig) -> int:
    """Bytes per rank for what goes through shared memory: a step's all-reduce (every token's hidden state) and its
    logits' all-gather (a sampled row per sequence, a rank's share of the vocabulary). Larger transfers (a long
    prompt's KV hand-over) take the process group."""
    hidden = engine.max_num_batched_tokens * config.hidden_size
    logits = engine.max_num_seqs * -(-config.vocab_size // engine.tensor_parallel_size)
    return max(hidden, logits, 1 << 18) * 4


def take_part(
    runner: ModelRunner,
    comm: Communicator,
    order: StepInputs | ReadKV | WriteKV,
    slots: torch.Tensor | None = None,
    kv: torch.Tensor | None = None,
) -> Any:
    """One rank's part in what rank 0 ordered (rank 0 passes its own `slots` and `kv`; the others take them from
    the order and the broadcast). A KV travels whole, [layers, 2, n, Hk, D]; each rank holds its heads of it.
    The rank's own work is `ModelRunner`'s, called as such: rank 0's methods are the ones that give the orders."""
    if isinstance(order, StepInputs):
        return ModelRunner.run(runner, order)
    assert runner.shard is not None
    heads = rank_slices(runner.config, runner.shard)
    slots = torch.tensor(order.slots, dtype=torch.int64) if slots is None else slots
    if isinstance(order, ReadKV):
        mine = (
            ModelRunner.read_kv(runner, slots).movedim(3, -1).contiguous()
        )  # heads last: the all-gather joins the last dimension
        return comm.all_gather(mine, list(heads.kv_head_counts)).movedim(-1, 3)
    kv = comm.broadcast(torch.empty(order.shape) if kv is None else kv, 0)
    ModelRunner.write_kv(runner, slots, kv[:, :, :, heads.kv_heads[0] : heads.kv_heads[1]])
    return None
