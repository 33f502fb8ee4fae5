"""The consumer side of KV events: which blocks one engine instance holds, per (medium, group), kept exact by
following its stream and healing every gap (what a router's `cache_aware` policy reads, and what the tests check).

A gap (a seq skipped: a slow subscriber past the PUB's high-water mark, a dropped batch, a reconnect) is healed by
replaying from the last seq + 1; when the publisher's ring no longer holds it, by its snapshot (a start seq of
0xFFFF_FFFF_FFFF_FFFF, our publisher's extension), then the batches after the snapshot's seq. A seq of 0 is a
publisher that (re)started: its blocks are those from 0 on."""

from __future__ import annotations

import msgspec
import zmq

from sagellm.common.errors import ProtocolError, Unavailable
from sagellm.runtime.engine.kv_events.publisher import END_SEQ, SNAPSHOT_SEQ
from sagellm.runtime.engine.kv_events.wire import GPU, AllBlocksCleared, BlockStored, KVEventBatch, Place, decode


class BlockSets:
    """The blocks an instance holds per (medium, group_idx), and the seq of the last batch applied (None: none)."""

    def __init__(self) -> None:
        self.sets: dict[Place, set[int | bytes]] = {}
        self.seq: int | None = None

    def apply(self, batch: KVEventBatch) -> None:
        """AllBlocksCleared empties every medium; BlockStored adds its blocks, BlockRemoved drops them (a block not
        held is no error). A missing medium is vLLM's GPU, a missing group 0."""
        for event in batch.events:
            if isinstance(event, AllBlocksCleared):
                self.sets.clear()
                continue
            place = (event.medium or GPU, event.group_idx or 0)
            if isinstance(event, BlockStored):
                self.sets.setdefault(place, set()).update(event.block_hashes)
            elif place in self.sets:
                self.sets[place].difference_update(event.block_hashes)
                if not self.sets[place]:
                    del self.sets[place]

    def holds(self, block_hash: int | bytes, medium: str = GPU, group_idx: int = 0) -> bool:
        return block_hash in self.sets.get((medium, group_idx), ())


class KvEventSubscriber:
    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None,
        topic: str = "",
        blocks: BlockSets | None = None,
        hwm: int = 100_000,
        timeout_s: float = 5.0,
    ) -> None:
        """Connects to a publisher's PUB `endpoint` and ROUTER `replay_endpoint` (None: gaps cannot heal) and syncs:
        a snapshot, or, given the `blocks` a closed subscriber had, a replay of what it missed. Unavailable when the
        publisher does not answer in `timeout_s`."""
        self.blocks = blocks if blocks is not None else BlockSets()
        self.gaps = 0  # seqs skipped in the stream
        self.snapshots = 0  # gaps (and starts) healed by a snapshot, not a replay
        self.applied = 0  # batches applied, from the stream, replays and snapshots
        self._replay_endpoint = replay_endpoint
        self._timeout_ms = int(timeout_s * 1000)
        self._dealer: zmq.Socket | None = None
        self._sub = zmq.Context.instance().socket(zmq.SUB)
        self._sub.set_hwm(hwm)
        self._sub.connect(endpoint)
        self._sub.subscribe(topic.encode())
        self.sync()

    def poll(self, timeout_s: float = 0.0) -> int:
        """Applies the batches that came, waiting up to `timeout_s` for the first; how many were applied."""
        before, wait_ms = self.applied, int(timeout_s * 1000)
        while self._sub.poll(wait_ms):
            frames = self._sub.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                raise ProtocolError(f"kv events: a PUB message of {len(frames)} frames, not (topic, seq, payload)")
            self._take(int.from_bytes(frames[1], "big"), frames[2])
            wait_ms = 0
        return self.applied - before

    def sync(self) -> None:
        """Brings `blocks` up to the publisher's latest batch now: a replay from seq + 1, or the snapshot when the ring
        no longer holds it or there is no seq yet. A router may call it when the stream has been quiet a while."""
        if self._replay_endpoint is None:
            return
        if self.blocks.seq is not None:
            for seq, payload in self._ask(self.blocks.seq + 1):
                if seq != self.blocks.seq + 1:
                    break  # the ring lost what follows: snapshot
                self._apply(seq, payload)
            else:
                return
        snapshot = self._ask(SNAPSHOT_SEQ)
        if snapshot:  # else a publisher without snapshots (vLLM's): the stream goes on from what we have
            self.snapshots += 1
            self.blocks.sets.clear()
            self._apply(*snapshot[0])

    def close(self) -> None:
        for sock in (self._sub, self._dealer):
            if sock is not None:
                sock.close(linger=0)

    def _take(self, seq: int, payload: bytes) -> None:
        last = self.blocks.seq
        if seq == 0 and last is not None:  # the publisher restarted
            self.blocks = BlockSets()
        elif last is not None and seq <= last:
            return  # replayed or in the snapshot already
        elif last is not None and seq != last + 1 and self._replay_endpoint is not None:
            self.gaps += 1
            self.sync()
            if seq <= self.blocks.seq:
                return
        self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            batch = decode(payload)
        except msgspec.ValidationError as e:
            raise ProtocolError(f"kv events: batch {seq} is not vLLM's KVEventBatch: {e}") from None
        self.blocks.apply(batch)
        self.blocks.seq = seq
        self.applied += 1

    def _ask(self, start: int) -> list[tuple[int, bytes]]:
        """A replay from `start` (or the snapshot): the `(seq, payload)` frames before the end marker."""
        if self._dealer is None:
            self._dealer = zmq.Context.instance().socket(zmq.DEALER)
            self._dealer.connect(self._replay_endpoint)
        self._dealer.send_multipart((b"", start.to_bytes(8, "big")))
        frames: list[tuple[int, bytes]] = []
        while True:
            if not self._dealer.poll(self._timeout_ms):
                self._dealer.close(linger=0)  # a late answer must not be read as the next one's
                self._dealer = None
                raise Unavailable(f"kv events: no replay answer from {self._replay_endpoint} "
                                  f"in {self._timeout_ms / 1000:g} s")  # fmt: skip
            parts = self._dealer.recv_multipart()
            if len(parts) != 4 or len(parts[2]) != 8:
                raise ProtocolError(f"kv events: a replay answer of {len(parts)} frames, not (b'', topic, seq, data)")
            if parts[2] == END_SEQ:
                return frames
            frames.append((int.from_bytes(parts[2], "big"), parts[3]))
