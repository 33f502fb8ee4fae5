"""The KV events' wire format: vLLM's msgspec structs, declared field for field, so vLLM's subscribers (llm-d,
Dynamo, vLLM's own router) read our events and we read theirs.

Pinned to **vLLM 0.32.0** (`vllm/distributed/kv_events.py`): `EventBatch` is `array_like` + `omit_defaults`, so a
batch is `[ts, events, data_parallel_rank?]`; each event is a map tagged by its class name under `"type"`. A field
added, dropped or moved changes the bytes, which `tests/engine/data/kv_events/*.msgpack` (written by vLLM's own
structs, `scripts/kv_events_golden.py`) pin. This module imports nothing but msgspec: the golden script loads it by
path into vLLM's venv to prove that vLLM decodes what we encode."""

from __future__ import annotations

from typing import Any

import msgspec

VLLM_VERSION = "0.32.0"

# The medium a block is held in. vLLM names its own block pool "GPU" whatever the device, so the engine's pages are
# GPU even on CPU; "CPU" is vLLM's offloading medium, our RAM tier. vLLM 0.32.0 spells a storage tier "STORAGE";
# ours is "DISK".
GPU = "GPU"
CPU = "CPU"
DISK = "DISK"

BlockHash = bytes | int  # vLLM's ExternalBlockHash: ours are u64 ints; vLLM's sha256 form is bytes
Place = tuple[str, int]  # (medium, group_idx): where a block is held; sets of blocks are kept per place


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """An event's base: `tag=True` puts `"type": "<class name>"` first in its map, so the class names are wire."""


class BlockStored(KVCacheEvent):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None  # the first block's chain predecessor; None for a prompt's first block
    token_ids: list[int]  # every block's tokens, flattened
    block_size: int
    lora_id: int | None  # deprecated by vLLM for lora_name, still sent
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None  # per block: (lora name?, (mm id, offset)..., salt)
    group_idx: int | None = None  # the KV cache group: 0 full attention, 1 sliding window
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None  # "LOCAL" or "REMOTE" to the publisher
    ownership: str | None = None  # a secondary offloading tier's id
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[BlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    """Everything the publisher held, in every medium, is gone."""


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode(batch: KVEventBatch) -> bytes:
    """A batch's payload frame, byte for byte what vLLM 0.32.0's publisher sends for the same batch."""
    return msgspec.msgpack.encode(batch)


def decode(payload: bytes) -> KVEventBatch:
    """A payload frame (ours or a vLLM publisher's) as a batch; msgspec.ValidationError if it is neither."""
    return _decoder.decode(payload)
