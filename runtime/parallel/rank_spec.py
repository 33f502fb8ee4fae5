"""What rank 0 tells the other tensor parallel ranks: how to start (one JSON argument), then, beside each step's
`StepInputs`, the KV hand-overs all ranks take part in, for a model with recurrent layers the moves of their
states (each stage holds its own layers'), and the LoRA adapters put in the engine's slots."""

from __future__ import annotations

import msgspec

from sagellm.runtime.engine.cache_geometry import CacheGeometry


class RankSpec(msgspec.Struct, kw_only=True):
    model: str  # the model's path: every rank loads it and keeps its own part
    language_model_only: bool = False  # a multimodal model's text model alone (EngineConfig's)
    rank: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    host: str  # rank 0's group store
    port: int
    backend: str
    cache: CacheGeometry  # rank 0 sized it; every rank allocates as many blocks (for its own heads and layers)
    quantized_weights: bool
    dtype: str = "float32"  # the linears' (EngineConfig.dtype)
    int8_activations: bool = False  # EngineConfig's
    num_threads: int | None
    adaptive_threads: bool = True  # fewer threads while others use the rank's cores (runtime/engine/thread_governor.py)
    device_ids: list[int] | None = None  # the engine's; the rank takes its share (runtime/engine/placement.py)
    # Shared memory segments (memfds rank 0 passed down): the whole group's, and each stage's (tp > 1 and pp > 1).
    world_fd: int | None = None
    world_capacity: int = 0
    stage_fds: list[int] = msgspec.field(default_factory=list)
    stage_capacity: int = 0
    num_state_slots: int = 0  # a model with recurrent layers: every rank's state slots (its layers', its heads)
    max_loras: int = 0  # LoRA adapter slots every rank holds its slice of (0: no adapters)
    max_lora_rank: int = 0

    def encode(self) -> str:
        return msgspec.json.encode(self).decode()

    @staticmethod
    def decode(text: str) -> RankSpec:
        return msgspec.json.decode(text, type=RankSpec)


class ReadKV(msgspec.Struct, array_like=True, tag="read_kv"):
    """Every rank reads its KV heads at `slots`; an all-gather joins them at rank 0 (a prefill's hand-over)."""

    slots: list[int]


class WriteKV(msgspec.Struct, array_like=True, tag="write_kv"):
    """Rank 0 broadcasts a KV of `shape` next; every rank stores its KV heads of it at `slots` (a decode's import)."""

    slots: list[int]
    shape: list[int]


class ReadStates(msgspec.Struct, array_like=True, tag="read_states"):
    """Every stage reads its layers' states in `slot`; rank 0 joins them in stage order (a prefill's hand-over)."""

    slot: int


class WriteStates(msgspec.Struct, array_like=True, tag="write_states"):
    """Rank 0 broadcasts `size` state values next; every stage stores its layers' share in `slot` (an import)."""

    slot: int
    size: int


class LoadLora(msgspec.Struct, array_like=True, tag="load_lora"):
    """Every rank puts a LoRA adapter in its slot: rank 0, which read it from its directory, broadcasts its factors
    next as one float32 tensor (each weight's A [lora_rank, in], then its B [out, lora_rank], in `shapes`' order), and
    every rank keeps its slice of them. No other rank reads the directory."""

    slot: int
    lora_rank: int
    scaling: float
    shapes: list[tuple[str, int, int]]  # each base weight the adapter changes, by canonical name, and its [out, in]


ORDERS = ReadKV | WriteKV | ReadStates | WriteStates | LoadLora  # what ranks take part in beside steps


def ready_key(rank: int) -> str:
    """The store key a rank sets once its weights are prepared."""
    return f"ready/{rank}"


def failed_key(rank: int) -> str:
    """The store key a rank sets to say why it could not start."""
    return f"failed/{rank}"
