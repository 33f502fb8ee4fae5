"""Rank 0 of an engine's group of processes (tensor parallel slices of pipeline stages): the engine's runner, which
starts the other ranks and leads every step.

The engine (scheduler, sampler, detokenizer) lives only here. Each step rank 0 broadcasts the step's inputs as
numbers (`StepInputs`, msgpack: data, never code), then every rank runs its part (`take_part`): its stage's layers,
its slice of them; the all-reduces keep a stage's slices in lockstep, the hidden state goes from stage to stage,
and the logits come back here to sample. A prefill's KV hand-over is led the same way (`ReadKV`, `WriteKV`).

Start-up: rank 0 opens the group's store and shared memory, starts ranks 1.. as processes (`rank_worker`), prepares
its own part of the weights while they load theirs, and connects once every rank has said it is ready in the store.
With `distributed_executor_backend: ray` the ranks are processes on the nodes of a Ray placement group instead (one
bundle per rank, spread over the nodes), reaching the store at this node's address, with no shared memory.
A rank that fails to start says why there; one that dies says it by its exit. A rank lost later fails the next step
with `RunnerLostError`: the engine cannot go on, and whoever runs it (a worker's restart, the user) starts it again.
"""

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
from sagellm.common.errors import InvalidInput, StartFailed
from sagellm.common.parent_death import env_for_child
from sagellm.common.processes import python_module
from sagellm.common.progress import stage
from sagellm.common.ray_process import RayProcess, connect, import_ray
from sagellm.runtime.comm import shared_collectives
from sagellm.runtime.comm.collectives import CollectiveError, open_store
from sagellm.runtime.engine.cache_geometry import CacheGeometry
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.lora_weights import LoraWeights
from sagellm.runtime.engine.model_runner import ModelRunner, RunnerLostError, StepInputs
from sagellm.runtime.engine.placement import place
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.lora_adapter import LoraAdapter
from sagellm.runtime.models.pipeline_stages import PipelineStage
from sagellm.runtime.multimodal.encoder_cache import EncoderCache
from sagellm.runtime.parallel.layout import RankComms, RankLayout
from sagellm.runtime.parallel.rank_spec import (
    ORDERS,
    LoadLora,
    RankSpec,
    ReadKV,
    ReadStates,
    WriteKV,
    WriteStates,
    failed_key,
    ready_key,
)
from sagellm.runtime.parallel.take_part import stage_states_size, take_part

log = structlog.get_logger("sagellm.parallel")
START_TIMEOUT_S = 900.0  # a rank loads the whole model file before it keeps its part
STOP_TIMEOUT_S = 10.0
ORDERS_CAPACITY = 1 << 20  # the group's segment when it carries only rank 0's orders (several stages)


class RankStartError(StartFailed, RuntimeError):
    """A rank of the group could not start (its reason, or its exit code)."""


class ParallelRunner(ModelRunner):
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
        prefault_kv_cache: bool = False,
        linear_dtype: torch.dtype = torch.float32,
        int8_activations: bool = False,
        mapped: Any = None,
        num_state_slots: int = 0,
        lora: LoraWeights | None = None,
        encoder: EncoderCache | None = None,
        max_step_tokens: int = 0,
    ) -> None:
        """`lora`: rank 0's LoRA adapter weights (every rank makes its own alike); `encoder`: a model that sees
        images or hears audio, its encoders, here alone (each step's embeddings go to the first stage's ranks);
        `max_step_tokens`: ModelRunner's, every rank's (their rope rows for a step's pictures)."""
        layout = RankLayout(engine.tensor_parallel_size, engine.pipeline_parallel_size, 0)
        if not engine.model:
            raise InvalidInput("a parallel engine needs the model's path: every rank loads it")
        place(backend, engine.device_ids, engine.num_threads, 0, layout.world_size, engine.adaptive_threads)
        on_ray = engine.distributed_executor_backend == "ray"
        ray = connect(os.environ.get("RAY_ADDRESS", "auto")) if on_ray else None
        store = open_store(layout.world_size)
        host = ray.util.get_node_ip_address() if ray is not None else store.host  # where the other ranks find it
        segments = _Segments(layout, backend, _shared_capacity(config, engine), shared=not on_ray)
        spec = RankSpec(
            model=engine.model,
            language_model_only=engine.language_model_only,
            rank=0,
            tensor_parallel_size=layout.tp,
            pipeline_parallel_size=layout.pp,
            host=host,
            port=store.port,
            backend=backend.name,
            cache=CacheGeometry(
                num_blocks=num_blocks,
                block_size=block_size,
                max_model_len=max_model_len,
                max_step_tokens=max_step_tokens,
            ),
            quantized_weights=engine.quantized_weights,
            dtype=str(linear_dtype).removeprefix("torch."),
            int8_activations=int8_activations,
            num_threads=engine.num_threads,
            adaptive_threads=engine.adaptive_threads,
            device_ids=engine.device_ids,
            world_fd=segments.world_fd,
            world_capacity=segments.world_capacity,
            stage_fds=segments.stage_fds,
            stage_capacity=segments.stage_capacity,
            num_state_slots=num_state_slots,
            max_loras=lora.max_loras if lora is not None else 0,
            max_lora_rank=lora.max_rank if lora is not None else 0,
        )
        self.layout = layout
        self._comms = RankComms.open(layout, store, backend.collective_library, spec)
        self.ranks: list[subprocess.Popen | RayProcess] = []  # ranks 1.., in order
        self._ray_group: Any = None  # the ranks' placement group on Ray
        self._encoder = msgspec.msgpack.Encoder()
        try:
            commands = [
                python_module("sagellm.runtime.parallel.rank_worker", msgspec.structs.replace(spec, rank=r).encode())
                for r in range(1, layout.world_size)
            ]
            if ray is not None:
                self._ray_group = _placement_group(ray, len(commands), engine, backend)
                self.ranks = _ray_ranks(self._ray_group, commands, engine)
            else:
                env = env_for_child()  # they end with this process
                self.ranks = [
                    subprocess.Popen(c, stdin=subprocess.DEVNULL, pass_fds=segments.fds, env=env) for c in commands
                ]
            super().__init__(
                config,
                weights,
                backend,
                num_blocks=num_blocks,
                block_size=block_size,
                max_model_len=max_model_len,
                quantized=quantized,
                shard=layout.shard,
                stage=layout.stage,
                collectives=self._comms.stage,
                prefault_kv_cache=prefault_kv_cache,
                linear_dtype=linear_dtype,
                int8_activations=int8_activations,
                mapped=mapped,
                num_state_slots=num_state_slots,
                lora=lora,
                encoder=encoder,
                max_step_tokens=max_step_tokens,
            )
            with stage(f"waiting for {layout.world_size - 1} more rank(s) of the engine to load the model"):
                self._wait_ready(store)
            self._comms.connect()
        except BaseException:
            self._kill()
            raise
        finally:
            segments.close_fds()  # every rank has mapped them, or failed
        log.info("parallel_engine_ready", tp=layout.tp, pp=layout.pp, threads=torch.get_num_threads())

    def run(self, step: StepInputs, media: dict[str, torch.Tensor | None] | None = None) -> torch.Tensor:
        """`media`: the step's image and audio rows and their embeddings (step_media.py), which the step's order
        names and its embeddings follow to the other ranks."""
        rows = (media or {}).get("mm_rows")
        if rows is not None:
            step = msgspec.structs.replace(step, media_rows=rows.tolist())
        with self._leading(step):
            return take_part(self, self.layout, self._comms, step, media_embeds=(media or {}).get("mm_embeds"))

    def read_kv(
        self, slots: torch.Tensor, out: torch.Tensor | None = None, window_slots: torch.Tensor | None = None
    ) -> torch.Tensor:
        _one_group(window_slots)
        with self._leading(ReadKV(slots.tolist())):
            whole = take_part(self, self.layout, self._comms, ReadKV([]), slots)
        return whole if out is None else out.copy_(whole)

    def write_kv(self, slots: torch.Tensor, kv: torch.Tensor, window_slots: torch.Tensor | None = None) -> None:
        _one_group(window_slots)
        kv = kv.to(torch.float32).contiguous()
        with self._leading(WriteKV(slots.tolist(), list(kv.shape))):
            take_part(self, self.layout, self._comms, WriteKV([], list(kv.shape)), slots, kv)

    @property
    def states_size(self) -> int:
        """Every stage's state values per slot, together."""
        return sum(stage_states_size(self.config, PipelineStage(i, self.layout.pp)) for i in range(self.layout.pp))

    def read_states(self, slot: int) -> torch.Tensor:
        with self._leading(ReadStates(slot)):
            return take_part(self, self.layout, self._comms, ReadStates(slot))

    def write_states(self, slot: int, states: torch.Tensor) -> None:
        states = states.to(torch.float32).contiguous()  # its size checked by the engine when the request came
        with self._leading(WriteStates(slot, states.numel())):
            take_part(self, self.layout, self._comms, WriteStates(slot, states.numel()), kv=states)

    def load_lora(self, slot: int, adapter: LoraAdapter) -> None:
        shapes = [(weight, b.shape[0], a.shape[1]) for weight, (a, b) in adapter.weights.items()]
        order = LoadLora(slot, adapter.rank, adapter.scaling, shapes)
        with self._leading(order):
            take_part(self, self.layout, self._comms, order, adapter=adapter)

    @contextlib.contextmanager
    def _leading(self, order: StepInputs | ORDERS) -> Iterator[None]:
        """Tells the other ranks what to do next, then does rank 0's part; a lost rank ends the runner."""
        try:
            self._comms.world.broadcast_bytes(self._encoder.encode(order))
            yield
        except CollectiveError as error:
            raise RunnerLostError(f"a rank of the engine is gone: {error}") from error

    def close(self) -> None:
        """Tells the ranks to stop (an empty order) and waits for them; a rank that does not stop is killed."""
        super().close()
        if not self.ranks:
            return
        if all(rank.poll() is None for rank in self.ranks):
            with contextlib.suppress(CollectiveError):  # a rank gone meanwhile: the others stop on the error
                self._comms.world.broadcast_bytes(b"")
        self._comms.close()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for rank in self.ranks:
            _end(rank, max(0.0, deadline - time.monotonic()))
        self._forget_ranks()

    def _wait_ready(self, store: Any) -> None:
        """Returns once every other rank has said it is ready; raises RankStartError for one that failed, exited or
        took longer than START_TIMEOUT_S. A poll, not an event: what it waits for is other processes (a note in the
        store, or an exit code), and the store's blocking `wait` watches keys that all get set, so it would miss a
        rank that fails or dies; a rank's start takes seconds, a look costs a round trip to the store."""
        pending = set(range(1, len(self.ranks) + 1))
        deadline = time.monotonic() + START_TIMEOUT_S
        while pending:
            for rank in sorted(pending):
                if store.check([failed_key(rank)]):
                    raise RankStartError(
                        f"rank {rank} of the engine could not start: {store.get(failed_key(rank)).decode()}"
                    )
                if store.check([ready_key(rank)]):
                    pending.discard(rank)
                elif (code := self.ranks[rank - 1].poll()) is not None:
                    raise RankStartError(f"rank {rank} of the engine exited with code {code} while starting")
            if time.monotonic() > deadline:
                raise RankStartError(f"rank(s) {sorted(pending)} of the engine not ready in {START_TIMEOUT_S:g} s")
            time.sleep(0.05)

    def _kill(self) -> None:
        for rank in self.ranks:
            _end(rank, 0.0)
        self._forget_ranks()

    def _forget_ranks(self) -> None:
        self.ranks = []
        if self._ray_group is not None:
            import_ray().util.remove_placement_group(self._ray_group)
            self._ray_group = None


def _end(rank: subprocess.Popen | RayProcess, timeout_s: float) -> None:
    """Waits up to `timeout_s` for a rank to exit, then kills it."""
    if isinstance(rank, RayProcess):
        if rank.join(timeout_s) is None:
            rank.kill()
            rank.join(None)
        return
    try:
        rank.wait(timeout_s)
    except subprocess.TimeoutExpired:
        rank.kill()
        rank.wait()


def _placement_group(ray: Any, ranks: int, engine: EngineConfig, backend: HardwareBackend) -> Any:
    """One bundle per rank (its threads' CPUs, its accelerator), spread over the cluster's nodes as far as they have
    room; waits until Ray has reserved them."""
    bundle = {"CPU": _rank_cpus(engine)} | ({"GPU": 1.0} if backend.name != "cpu" else {})
    group = ray.util.placement_group([dict(bundle) for _ in range(ranks)], strategy="SPREAD")
    try:
        ray.get(group.ready(), timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        raise RankStartError(f"Ray could not reserve {ranks} x {bundle} for the engine's ranks") from None
    return group


def _rank_cpus(engine: EngineConfig) -> float:
    """The CPUs a rank reserves on Ray: its torch threads."""
    return float(engine.num_threads or 1)


def _ray_ranks(group: Any, commands: list[list[str]], engine: EngineConfig) -> list[RayProcess]:
    """Each rank's process on its bundle's node; the ranks find rank 0's store at the address in their spec."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    env = {"SAGELLM_LOG_LEVEL": os.environ.get("SAGELLM_LOG_LEVEL", "warning")}
    ranks = []
    for index, command in enumerate(commands):
        where = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
        options = {"num_cpus": _rank_cpus(engine), "scheduling_strategy": where}
        ranks.append(RayProcess.launch(options, lambda host, port, c=command: c, env, START_TIMEOUT_S))
    return ranks


def _one_group(window_slots: torch.Tensor | None) -> None:
    """A parallel group's ranks keep every layer's blocks in one group (window_blocks.py is single-rank)."""
    if window_slots is not None:
        raise ValueError("a parallel engine's sliding-window layers share the full layers' blocks: no window slots")


class _Segments:
    """The group's shared memory on this host (CPU ranks only): one segment for the whole group (rank 0's orders,
    and the all-reduces too when there is one stage), one per stage for its slices' all-reduces (several stages of
    several slices). Descriptors: every rank gets them all (`pass_fds`) and maps its own."""

    def __init__(self, layout: RankLayout, backend: HardwareBackend, capacity: int, *, shared: bool = True) -> None:
        """`shared` False: ranks on other hosts, no segments (every collective takes the process group)."""
        self.world_fd, self.world_capacity, self.stage_fds, self.stage_capacity = None, 0, [], 0
        if not shared or not shared_collectives.supported():
            return
        on_cpu = backend.collective_library == "gloo"
        self.world_capacity = capacity if on_cpu and layout.pp == 1 else ORDERS_CAPACITY
        self.world_fd = shared_collectives.create_segment(layout.world_size, self.world_capacity)
        if on_cpu and layout.pp > 1 and layout.tp > 1:
            self.stage_fds = [shared_collectives.create_segment(layout.tp, capacity) for _ in range(layout.pp)]
            self.stage_capacity = capacity

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.world_fd, *self.stage_fds) if fd is not None)

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _shared_capacity(config: ModelConfig, engine: EngineConfig) -> int:
    """Bytes per rank for what goes through shared memory: a step's all-reduce (every token's hidden state) and its
    logits' all-gather (a sampled row per sequence, a rank's share of the vocabulary). Larger transfers (a long
    prompt's KV hand-over) take the process group."""
    hidden = engine.max_num_batched_tokens * config.hidden_size
    logits = engine.max_num_seqs * -(-config.vocab_size // engine.tensor_parallel_size)
    return max(hidden, logits, 1 << 18) * 4
