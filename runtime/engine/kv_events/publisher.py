"""KV event batches on ZeroMQ, as vLLM's `ZmqEventPublisher` sends them: PUB multipart `(topic, seq as 8 bytes
big-endian, payload)`, and a ROUTER that replays the last `buffer_steps` batches to a subscriber that missed some.

Replay protocol (vLLM's): a request `[identity, b"", start seq (8 bytes)]` is answered with one `[identity, b"", topic,
seq, payload]` per buffered seq >= start, then `[identity, b"", b"", -1 (8 bytes, signed), b""]`. Ours too: a start of
0xFFFF_FFFF_FFFF_FFFF is answered with the recorder's snapshot `(S, batch)` as one frame, then the same end: a
subscriber that joins late or fell out of the ring resets to it and goes on from S+1.

One thread owns both sockets; the engine thread only appends `(seq, batch)` to a queue (the recorder's sink), so it
never waits on the network. The seq is the recorder's, assigned at flush, so a snapshot knows what it includes."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable

import structlog
import zmq

from sagellm.common.errors import FieldError, InternalError
from sagellm.runtime.engine.kv_events.config import FIELD, KvEventsConfig, offset_endpoint
from sagellm.runtime.engine.kv_events.wire import KVEventBatch, encode

log = structlog.get_logger("sagellm.kv_events")

SNAPSHOT_SEQ = 0xFFFF_FFFF_FFFF_FFFF  # a replay request's start: answer the snapshot instead
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # the last frame of a replay answer
REPLAY_POLL_S = 0.02  # how late a replay request may be answered while no batch comes
LINGER_MS = 1000  # how long the last batches may take to leave once closed


class ZmqKvEventPublisher:
    def __init__(
        self,
        config: KvEventsConfig,
        snapshot: Callable[[], tuple[int, KVEventBatch]],
        data_parallel_rank: int | None = None,
    ) -> None:
        """Binds or connects now (a taken port is an error here); `snapshot` is the recorder's, called on the
        publisher thread. `data_parallel_rank`, the engine instance's index, offsets the ports and is stamped on
        every batch, as vLLM stamps its DP rank (None: 0, a single instance)."""
        self._rank = data_parallel_rank or 0
        self._snapshot = snapshot
        self._topic = config.topic.encode()
        self._max_queue = config.max_queue_size
        self._queue: queue.SimpleQueue[tuple[int, KVEventBatch] | None] = queue.SimpleQueue()
        self._ring: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)  # (seq, payload), thread's own
        self.dropped = 0  # batches the queue had no room for: subscribers see the gap and replay or snapshot
        self.sent_seq = -1  # the last batch sent: the recorder's seq minus this is the queue's lag
        self._closed = False
        context = zmq.Context.instance()  # shared: never terminated here
        self._pub = context.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._replay: zmq.Socket | None = None
        try:
            self.endpoint = _open(self._pub, offset_endpoint(config.endpoint, self._rank), "endpoint")
            self.replay_endpoint = None
            if config.replay_endpoint is not None:
                self._replay = context.socket(zmq.ROUTER)
                self._replay.set_hwm(max(config.hwm, config.buffer_steps + 2))  # a whole ring's answer fits
                replay_endpoint = offset_endpoint(config.replay_endpoint, self._rank)
                self.replay_endpoint = _open(self._replay, replay_endpoint, "replay_endpoint", bind=True)
        except FieldError:
            self._close_sockets(linger_ms=0)
            raise
        self._thread = threading.Thread(target=self._run, name="kv-events-publisher", daemon=True)
        self._thread.start()

    def append(self, item: tuple[int, KVEventBatch], /) -> None:
        """The recorder's sink: queue one `(seq, batch)` for the thread; never blocks."""
        if self._closed:
            raise InternalError("kv events: a batch was flushed to a closed publisher")
        if self._queue.qsize() >= self._max_queue:
            self.dropped += 1
            return
        self._queue.put(item)

    def close(self, timeout_s: float = 5.0) -> None:
        """Publishes what is queued, then stops the thread and closes the sockets."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            while True:
                while self._replay is not None and self._replay.poll(0):
                    self._guarded(self._answer_replay)
                try:
                    item = self._queue.get(timeout=REPLAY_POLL_S if self._replay is not None else None)
                except queue.Empty:
                    continue
                if item is None:
                    return
                self._guarded(self._publish, *item)
        finally:
            self._close_sockets(LINGER_MS)

    def _publish(self, seq: int, batch: KVEventBatch) -> None:
        payload = self._encode(batch)
        self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        self._ring.append((seq, payload))
        self.sent_seq = seq

    def _answer_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("kv_events.bad_replay_request", frames=len(frames))
            return
        client, _, start = frames
        start_seq = int.from_bytes(start, "big")
        if start_seq == SNAPSHOT_SEQ:
            seq, batch = self._snapshot()
            answer = [(seq, self._encode(batch))]
        else:
            answer = [(seq, payload) for seq, payload in self._ring if seq >= start_seq]
        for seq, payload in answer:
            self._replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", b"", END_SEQ, b""))

    def _encode(self, batch: KVEventBatch) -> bytes:
        if batch.data_parallel_rank is None:
            batch.data_parallel_rank = self._rank
        return encode(batch)

    def _guarded(self, work: Callable[..., None], *args: object) -> None:
        """One batch or replay that fails is logged, not fatal: subscribers see the gap and heal it."""
        try:
            work(*args)
        except Exception:
            log.exception("kv_events.publisher_error")

    def _close_sockets(self, linger_ms: int) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=linger_ms)


def binds(endpoint: str) -> bool:
    """vLLM's rule, whether the PUB binds (else it connects to a subscriber's bound SUB): a wildcard host, ipc or
    inproc. Ours too: a tcp port of 0, which only a bind can have."""
    wildcard = "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))
    return wildcard or (endpoint.startswith("tcp://") and endpoint.endswith(":0"))


def _open(sock: zmq.Socket, endpoint: str, key: str, bind: bool | None = None) -> str:
    """Binds or connects `sock`; the endpoint it has (a port of 0 resolved)."""
    try:
        if bind if bind is not None else binds(endpoint):
            sock.bind(endpoint)
            return sock.getsockopt_string(zmq.LAST_ENDPOINT)
        sock.connect(endpoint)
        return endpoint
    except zmq.ZMQError as e:
        raise FieldError(f"{FIELD}.{key}", f"{FIELD}.{key}: cannot open {endpoint}: {e.strerror}") from None


def connectable(endpoint: str | None) -> str | None:
    """A bound endpoint as a subscriber on this host connects to it: a wildcard host (`*`, 0.0.0.0, ::) is loopback."""
    if endpoint is None or not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if host in ("*", "0.0.0.0", "[::]", "::", "[*]"):
        host = "127.0.0.1"
    return f"tcp://{host}:{port}"
