"""KV blocks fetched from another engine instance: a ZeroMQ server that answers with the blocks an instance holds
(its pages, checkpoints and tiers), and the client an engine fetches a prompt's prefix with.

One round trip a prompt: the ask names the blocks by key (group and chained hash), the answer carries each block
found as two frames, the header a block file begins with (block_file.py: the identity of the KV layout, the key and
what its hash is of, the payload's CRC32) and the payload, sent from and received into memory without a copy
(`copy=False`, as the pipeline's KV hand-over moves tensors). So a block from a peer is checked exactly as one from
the disk: our identity, a hash re-derived from the header, the meta our own chain computed, the length, the CRC; one
that fails is dropped and its prompt computed from there.

Ask:    [msgpack BlockAsk(version, token, identity sha256, [[group, hash], ...])]
Answer: [msgpack BlockAnswer(error, count), header 1, payload 1, ..., header n, payload n]

The server asks for a token it makes at start and publishes only to the control plane (`InstanceStats`), since a
block's header holds its prompt's tokens: knowing a hash (KV events publish them) must not be enough to read a
prompt. It binds to the host the engine's KV events are published on (loopback for a wildcard)."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
import zlib
from collections.abc import Callable

import msgspec
import structlog
import torch
import zmq

from sagellm.runtime.engine.kv_tiers.block_file import BadBlock, BlockKey, BlockMeta, check_header, encode_header
from sagellm.runtime.engine.peer_prefix import PeerPrefix

log = structlog.get_logger("sagellm.kv_tiers")

VERSION = 1
MAX_KEYS = 8192  # an ask of more is refused: 8,192 blocks of 16 tokens is a 131k-token prompt
FETCH_TIMEOUT_S = 2.0  # a fetch blocks its engine's schedule: a peer slower than this is a miss
QUIET_AFTER_FAILURE_S = 30.0  # a peer that failed a fetch is not asked again for this long
POLL_MS = 200

Found = list[tuple[BlockKey, BlockMeta, torch.Tensor]]


class BlockAsk(msgspec.Struct, array_like=True):
    version: int
    token: str
    identity: bytes
    keys: list[tuple[str, int]]


class BlockAnswer(msgspec.Struct, array_like=True, omit_defaults=True):
    error: str | None = None
    count: int = 0


class BlockServer:
    """Answers asks for blocks on a ROUTER socket, in a thread of its own; `export(keys)` finds them (the caller
    makes it safe to run beside the engine's steps)."""

    def __init__(self, bind: str, identity_sha: bytes, export: Callable[[list[BlockKey]], Found]) -> None:
        self.token = secrets.token_hex(16)
        self._identity_sha, self._export = identity_sha, export
        self._socket = zmq.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if bind.startswith("tcp://") and bind.endswith((":*", ":0")):
            base = bind.rpartition(":")[0]
            self.endpoint = f"{base}:{self._socket.bind_to_random_port(base)}"
        else:
            self._socket.bind(bind)
            self.endpoint = bind
        self.served_blocks = self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kv-blocks-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._socket.poll(POLL_MS):
                    continue
                client, *frames = self._socket.recv_multipart(copy=False)
                self._socket.send_multipart([client, *self._answer(frames)], copy=False)
        except zmq.ZMQError as error:
            if not self._stop.is_set():
                log.error("kv_blocks_server_failed", error=str(error))
        finally:
            self._socket.close(linger=0)

    def _answer(self, frames: list[zmq.Frame]) -> list[bytes | memoryview]:
        try:
            ask = msgspec.msgpack.decode(frames[0].buffer, type=BlockAsk) if len(frames) == 1 else None
        except msgspec.DecodeError:
            ask = None
        problem = _problem(ask, self.token, self._identity_sha)
        if problem is not None:
            self.refused += 1
            log.warning("kv_blocks_ask_refused", why=problem)
            return [msgspec.msgpack.encode(BlockAnswer(error=problem))]
        try:
            keys = [BlockKey(group, block_hash) for group, block_hash in ask.keys]
        except ValueError as error:
            return [msgspec.msgpack.encode(BlockAnswer(error=str(error)))]
        found = self._export(keys)
        out: list[bytes | memoryview] = [msgspec.msgpack.encode(BlockAnswer(count=len(found)))]
        for key, meta, payload in found:
            data = memoryview(payload.contiguous().numpy())
            out += [encode_header(self._identity_sha, key, meta, data.nbytes, zlib.crc32(data)), data]
        self.served_blocks += len(found)
        return out


def _problem(ask: BlockAsk | None, token: str, identity_sha: bytes) -> str | None:
    if ask is None:
        return "malformed ask"
    if ask.version != VERSION:
        return f"version {ask.version}, this server speaks {VERSION}"
    if not hmac.compare_digest(ask.token.encode(), token.encode()):
        return "bad token"
    if ask.identity != identity_sha:
        return "another model or KV layout"
    if len(ask.keys) > MAX_KEYS:
        return f"{len(ask.keys)} keys, at most {MAX_KEYS}"
    return None


class BlockClient:
    """Fetches blocks from peers' `BlockServer`s (the engine's `PrefixTiers.peers`); counts what it fetched and the
    fetches that failed, and leaves a peer that failed alone for a while."""

    def __init__(self, identity_sha: bytes, timeout_s: float = FETCH_TIMEOUT_S) -> None:
        self._identity_sha, self._timeout_s = identity_sha, timeout_s
        self.fetched_blocks = self.failures = self.bad_blocks = 0
        self._failed_at: dict[str, float] = {}  # endpoint -> when a fetch from it last failed

    def fetch(self, peer: PeerPrefix, wanted: list[tuple[BlockKey, BlockMeta]], nbytes: dict[str, int]) -> Found:
        """Those of `wanted` the peer holds and sent whole, each checked to be that block and `nbytes[group]` long;
        what failed is logged, and costs at most the timeout."""
        if time.monotonic() - self._failed_at.get(peer.endpoint, -QUIET_AFTER_FAILURE_S) < QUIET_AFTER_FAILURE_S:
            return []
        ask = BlockAsk(VERSION, peer.token, self._identity_sha, [(key.group, key.block_hash) for key, _ in wanted])
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.connect(peer.endpoint)
            socket.send(msgspec.msgpack.encode(ask))
            frames = socket.recv_multipart(copy=False) if socket.poll(int(self._timeout_s * 1000)) else None
        except zmq.ZMQError as error:
            return self._failed(peer, str(error))
        finally:
            socket.close(linger=0)
        if frames is None:
            return self._failed(peer, f"no answer in {self._timeout_s} s")
        try:
            answer = msgspec.msgpack.decode(frames[0].buffer, type=BlockAnswer)
        except msgspec.DecodeError:
            return self._failed(peer, "malformed answer")
        if answer.error is not None or len(frames) != 1 + 2 * answer.count:
            return self._failed(peer, answer.error or f"{len(frames)} frames for {answer.count} blocks")
        found = self._checked(frames[1:], dict(wanted), nbytes)
        self.fetched_blocks += len(found)
        log.info("kv_blocks_fetched", peer=peer.instance, asked=len(wanted), got=len(found))
        return found

    def _checked(self, frames: list[zmq.Frame], wanted: dict[BlockKey, BlockMeta], nbytes: dict[str, int]) -> Found:
        found: Found = []
        for header, payload in zip(frames[::2], frames[1::2]):
            try:
                key, meta, length, crc = check_header(header.bytes, self._identity_sha)
                if wanted.get(key) != meta or length != nbytes.get(key.group) or len(payload.buffer) != length:
                    raise BadBlock("mismatch", "not a block asked for, or not this engine's size")
                if zlib.crc32(payload.buffer) != crc:
                    raise BadBlock("corrupt", "payload CRC32")
            except BadBlock as bad:
                self.bad_blocks += 1
                log.warning("kv_blocks_bad_block", why=bad.why, detail=str(bad))
                continue
            found.append((key, meta, torch.frombuffer(payload.buffer, dtype=torch.uint8)))
        return found

    def _failed(self, peer: PeerPrefix, why: str) -> Found:
        self.failures += 1
        self._failed_at[peer.endpoint] = time.monotonic()
        log.warning("kv_blocks_fetch_failed", peer=peer.instance, endpoint=peer.endpoint, why=why)
        return []
