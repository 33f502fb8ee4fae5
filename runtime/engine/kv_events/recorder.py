"""The engine side of KV events: the block bookkeeping says what it stored and dropped, the recorder turns that into
one vLLM `KVEventBatch` per step and keeps the set of blocks those batches imply, for snapshots.

Construction order, since the publisher's replay answers snapshots and the recorder feeds the publisher:

    publisher = ZmqKvEventPublisher(config, snapshot=lambda: recorder.snapshot(), data_parallel_rank=rank)
    recorder = KvEventRecorder(publisher)  # or a list, for consumers in this process

`stored`/`removed`/`cleared`/`flush` run on the engine thread; `snapshot` on any (the publisher's), so the held sets
are behind one lock, taken once per call (and for a C-speed dict copy per snapshot)."""

from __future__ import annotations

import threading
import time
from array import array
from typing import Any, NamedTuple, Protocol

from sagellm.common.errors import InternalError
from sagellm.runtime.engine.kv_events.wire import GPU, AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, Place


class EventSink(Protocol):
    """Takes each `(seq, batch)` in seq order: a `ZmqKvEventPublisher`, or a plain list."""

    def append(self, item: tuple[int, KVEventBatch], /) -> None: ...


class _Held(NamedTuple):
    """What re-announces one held block: its BlockStored fields."""

    parent: int | None
    tokens: array  # int32, block_size of them: a block's tokens without a Python int each
    lora_id: int | None
    lora_name: str | None
    extra_key: tuple[Any, ...] | None


class KvEventRecorder:
    def __init__(self, sink: EventSink) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        self._held: dict[Place, dict[int, _Held]] = {}  # insertion order: a chain stays consecutive, for snapshots
        self._pending: list[AllBlocksCleared | BlockStored | BlockRemoved] = [AllBlocksCleared()]
        self.seq = -1  # the last batch handed to the sink
        self.flush()  # seq 0 resets this instance at every subscriber, so there is always a seq to snapshot at

    def stored(
        self,
        block_hashes: list[int],
        parent: int | None,
        token_ids: list[int],
        block_size: int,
        medium: str,
        group_idx: int = 0,
        lora_name: str | None = None,
        extra_keys: list[tuple[Any, ...] | None] | None = None,
        lora_id: int | None = None,
    ) -> None:
        """Blocks now held in `medium`: a chain whose first block follows `parent`, `token_ids` all their tokens
        (block_size each), `extra_keys` one entry per block (or None). Blocks already held are not announced again:
        what is new goes out as one BlockStored per consecutive run."""
        if len(token_ids) != len(block_hashes) * block_size or (extra_keys and len(extra_keys) != len(block_hashes)):
            raise InternalError(f"kv events: {len(block_hashes)} blocks of {block_size} tokens given "
                                f"{len(token_ids)} tokens and {len(extra_keys or [])} extra keys")  # fmt: skip
        with self._lock:
            held = self._held.setdefault((medium, group_idx), {})
            new: list[int] = []
            for i, block_hash in enumerate(block_hashes):
                if block_hash not in held:
                    tokens = array("i", token_ids[i * block_size : (i + 1) * block_size])
                    before = block_hashes[i - 1] if i else parent
                    held[block_hash] = _Held(before, tokens, lora_id, lora_name, extra_keys[i] if extra_keys else None)
                    new.append(i)
            for start, end in _runs(new):
                self._pending.append(BlockStored(
                    block_hashes=block_hashes[start:end],
                    parent_block_hash=block_hashes[start - 1] if start else parent,
                    token_ids=token_ids[start * block_size : end * block_size], block_size=block_size,
                    lora_id=lora_id, medium=medium, lora_name=lora_name,
                    extra_keys=extra_keys[start:end] if extra_keys else None, group_idx=group_idx,
                ))  # fmt: skip

    def removed(self, block_hashes: list[int], medium: str, group_idx: int = 0) -> None:
        """Blocks no longer held in `medium`; those it did not hold are not announced."""
        with self._lock:
            held = self._held.get((medium, group_idx), {})
            gone = [block_hash for block_hash in block_hashes if held.pop(block_hash, None) is not None]
            if gone:
                self._pending.append(BlockRemoved(block_hashes=gone, medium=medium, group_idx=group_idx))

    def cleared(self) -> None:
        """The engine's own pages (GPU, every group) are all gone: a prefix cache reset, a sleep, an unload. vLLM's
        AllBlocksCleared names no medium, so subscribers drop everything: what RAM and disk still hold follows it."""
        with self._lock:
            self._held = {place: held for place, held in self._held.items() if place[0] != GPU}
            self._pending += [AllBlocksCleared(), *_announce(self._held)]

    def flush(self) -> None:
        """Once per engine step: what changed since the last flush goes to the sink as one batch with the next seq
        (nothing when nothing changed)."""
        with self._lock:
            if not self._pending:
                return
            events, self._pending = self._pending, []
            self.seq += 1
            seq = self.seq
        self._sink.append((seq, KVEventBatch(ts=time.time(), events=events)))

    def snapshot(self) -> tuple[int, KVEventBatch]:
        """`(S, AllBlocksCleared + a BlockStored per held chain)`: the held sets now, which is everything up to seq S
        and maybe part of what S+1 will carry. Applying S+1 over it still gives S+1's sets, since every event sets
        its blocks' membership outright, so a subscriber applies the batches after S as usual."""
        with self._lock:
            seq = self.seq
            copy = {place: dict(held) for place, held in self._held.items()}
        return seq, KVEventBatch(ts=time.time(), events=[AllBlocksCleared(), *_announce(copy)])

    def live_set(self) -> dict[Place, set[int]]:
        """The blocks held now, per (medium, group_idx), as a subscriber's `BlockSets.sets` must end up."""
        with self._lock:
            return {place: set(held) for place, held in self._held.items() if held}


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Ascending indices as `(start, end)` ranges of consecutive ones: [0, 1, 3] -> [(0, 2), (3, 4)]."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _announce(places: dict[Place, dict[int, _Held]]) -> list[BlockStored]:
    """A BlockStored per run of held blocks that continue one another's chain (same LoRA and block size), in the
    order they were stored."""
    events: list[BlockStored] = []
    for (medium, group_idx), held in places.items():
        chains: list[list[tuple[int, _Held]]] = []
        for block_hash, info in held.items():
            last = chains[-1][-1] if chains else None
            if last is not None and info.parent == last[0] and _same_kind(info, last[1]):
                chains[-1].append((block_hash, info))
            else:
                chains.append([(block_hash, info)])
        for chain in chains:
            first, extra_keys = chain[0][1], [info.extra_key for _, info in chain]
            events.append(BlockStored(
                block_hashes=[block_hash for block_hash, _ in chain], parent_block_hash=first.parent,
                token_ids=[token for _, info in chain for token in info.tokens], block_size=len(first.tokens),
                lora_id=first.lora_id, medium=medium, lora_name=first.lora_name,
                extra_keys=extra_keys if any(key is not None for key in extra_keys) else None, group_idx=group_idx,
            ))  # fmt: skip
    return events


def _same_kind(a: _Held, b: _Held) -> bool:
    return (a.lora_id, a.lora_name, len(a.tokens)) == (b.lora_id, b.lora_name, len(b.tokens))
