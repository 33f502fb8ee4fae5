"""The wire format of a pipeline edge between processes: a message is a list of ZeroMQ frames.

    frame 0   one byte, the frame type: DATA (a `sagellm.runtime.pipeline.messages.Message` item), BATCH (several),
              a control message (READY, HEARTBEAT, END, CANCEL, SLEEP; HELLO and ASSIGN, a peer joining), or APP (a
              message of a higher floor's own, whose types it hands to `carry`: the gateway's calls and snapshots)
    frame 1   the struct, msgspec msgpack (`array_like`, `omit_defaults`: positional and compact)
    frame 2.. tensors, one frame each, their raw bytes (none for tensors sent through shared memory)

A tensor inside a struct (`KVBlocks.data`, typed Any) is not serialized: encoding replaces it by a msgpack extension
holding a reference (frame index, dtype, shape) and appends the tensor's own memory as a frame, so a 47 MB KV payload
is never copied by us on the way out (ZeroMQ sends straight from the tensor's buffer). Decoding turns each reference
back into a tensor over the received frame's buffer, again without a copy. That is the vLLM v1 shape; there is no
pickle anywhere, so a peer can only ever send data, never code. On a link whose both ends are on this host, `encode`
is given the socket's `shared_memory.Link` and a tensor becomes a reference to a shared-memory segment instead (a
second extension type): the bytes never enter ZeroMQ or the kernel's socket buffers, and `decode` maps the segment.

Aliasing, both ways. Sending: ZeroMQ (or, through shared memory, the receiver) may still be reading a sent tensor
after `send` returns, so never write into a tensor after sending it (KV gathered out of the paged cache is a fresh
tensor, so that holds). Receiving: a decoded tensor aliases its frame's memory, which nobody else references (or a
shared-memory slot its sender leaves alone until the tensor is gone), so it may be read, kept or written freely; a
receiver that keeps data (the decode worker's paged cache) copies it into its own buffers anyway. Frames given as
read-only buffers (`bytes`) are copied once, so a decoded tensor is always safe to write."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, get_args

import msgspec

from sagellm.common.errors import ProtocolError
from sagellm.runtime.comm import shared_memory
from sagellm.runtime.comm.shared_memory import Handle, Link, SegmentError
from sagellm.runtime.pipeline.messages import Message

if TYPE_CHECKING:
    import torch

PROTOCOL = 13  # the wire format's version: raise it whenever a struct below or in the pipeline's messages changes
HEARTBEAT_S = 0.5  # how often both ends of a control channel send a Heartbeat
REQUESTS_KEY = "_requests"  # the Heartbeat stats entry listing the request ids the sender holds
STAGE_KEY = "_stage"  # the Heartbeat stats entry saying what a starting worker waits on (common.progress)
_TENSOR_EXT = 1  # msgpack extension type code of a tensor reference (to a frame)
_SHARED_EXT = 2  # msgpack extension type code of a tensor in shared memory (a `shared_memory.Handle`)


class WireError(ProtocolError, ValueError):  # ValueError: decoders' failures are caught as one
    """A received message that is not a well-formed sageLLM wire message (the message names the bad part)."""


class TensorLost(WireError):
    """A well-formed message whose tensor could not be had (its shared-memory segment is gone, stale or too small):
    `message` is the rest of it, decoded, so its request can be failed alone."""

    def __init__(self, problem: str, message: WireMessage) -> None:
        super().__init__(problem)
        self.message = message


class FrameType(enum.IntEnum):
    """Frame 0 of every message: which struct frame 1 holds."""

    DATA = 1
    READY = 2
    HEARTBEAT = 3
    END = 4
    HELLO = 5
    ASSIGN = 6
    CANCEL = 7
    BATCH = 8
    APP = 9
    SLEEP = 10


class Ready(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """A peer is up and its nodes are open: the executor sends it work only after this (a cross-process
    `nursery.start`). `info` carries what the parent needs back, e.g. the endpoints the peer bound."""

    node: str
    pid: int
    info: dict[str, Any] = msgspec.field(default_factory=dict)


class Heartbeat(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """A peer is alive; `stats` is a snapshot per engine instance it hosts (InstanceStats fields by name), which keeps
    route and pd_split current across processes."""

    node: str
    time: float  # the sender's wall clock, time.time()
    stats: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)


class End(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """An upstream peer finished: no more items will come from it (closing a channel, across processes). A worker
    that fails says why on its control socket with `error` (one line) and `kind` (the error's `code`, so its parent
    raises it as the same kind: a model that will not load is the user's to fix there too)."""

    node: str
    error: str = ""
    kind: str = ""


class Hello(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """A worker's first message to the parent's control socket: the process group it offers to run. Who it is
    (pid, host) names it in logs and errors; `protocol` lets the parent refuse a worker that speaks another wire
    format. Hello's own layout never changes, so any two versions can still tell each other that much."""

    node: str  # the process group
    pid: int
    host: str
    protocol: int


class Assign(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """The parent's answer to a Hello: the graph (YAML text, so the worker's host needs no copy of the file) and how
    long the parent may stay silent before the worker takes it for gone; or, with `error`, why it is refused."""

    graph: str = ""
    peer_timeout_s: float = 0.0
    error: str = ""


class Cancel(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """The parent tells its workers that these requests' clients left: whichever engine holds one aborts it between
    two steps (its blocks are freed) and sends its `abort` end down the graph."""

    node: str
    request_ids: list[str]


class Sleep(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """The parent brings a worker's engines to sleep `level` (1: their KV caches freed, 2: their weights too; vLLM's
    sleep mode) once they hold no request: deeper than they are, they sleep; shallower, they wake (0: whole, 1: the
    weights alone); its heartbeats then show each engine's `sleep_level`."""

    node: str
    level: int


class Batch(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """Data items in one message: what a busy sender has for one peer in one turn of its loop (the tokens of every
    request an API server waits on), so it sends one message a turn, not one a token."""

    items: list[Message]


Control = Ready | Heartbeat | End | Hello | Assign | Cancel | Sleep
WireMessage = Message | Batch | Control

_FRAME_TYPES: dict[type, FrameType] = {
    **dict.fromkeys(get_args(Message), FrameType.DATA),
    Ready: FrameType.READY,
    Heartbeat: FrameType.HEARTBEAT,
    End: FrameType.END,
    Hello: FrameType.HELLO,
    Assign: FrameType.ASSIGN,
    Cancel: FrameType.CANCEL,
    Sleep: FrameType.SLEEP,
    Batch: FrameType.BATCH,
}
_STRUCT_TYPES: dict[FrameType, Any] = {
    FrameType.DATA: Message,
    FrameType.READY: Ready,
    FrameType.HEARTBEAT: Heartbeat,
    FrameType.END: End,
    FrameType.HELLO: Hello,
    FrameType.ASSIGN: Assign,
    FrameType.CANCEL: Cancel,
    FrameType.SLEEP: Sleep,
    FrameType.BATCH: Batch,
}


def carry(messages: Any) -> None:
    """Lets the wire carry a higher floor's own messages in APP frames: `messages` is a union of tagged msgspec
    structs (the gateway's API server link: passed-on calls, their replies, the core's snapshots). A process that
    never called it takes an APP frame for a malformed message."""
    _FRAME_TYPES.update(dict.fromkeys(get_args(messages) or (messages,), FrameType.APP))
    _STRUCT_TYPES[FrameType.APP] = messages


class _TensorRef(msgspec.Struct, array_like=True):
    """What stands in a struct for a tensor: where its bytes are and how to view them."""

    frame: int
    dtype: str  # torch dtype name without the "torch." prefix
    shape: list[int]


_ref_encoder = msgspec.msgpack.Encoder()
_ref_decoder = msgspec.msgpack.Decoder(_TensorRef)
_handle_decoder = msgspec.msgpack.Decoder(Handle)


def encode(msg: WireMessage | msgspec.Struct, link: Link | None = None) -> list[bytes | memoryview]:
    """The frames of `msg`, ready for `send_multipart(copy=False)`; tensor frames view the tensors' memory. With
    `link` (the receiver is on this host) tensors go through shared memory, as frames only when it has no room."""
    frame_type = _FRAME_TYPES.get(type(msg))
    if frame_type is None:
        names = ", ".join(t.__name__ for t in _FRAME_TYPES)
        raise TypeError(f"cannot send a {type(msg).__name__} on the wire; only {names}")
    frames: list[bytes | memoryview] = [bytes((frame_type,)), b""]

    def tensor_to_ref(obj: Any) -> msgspec.msgpack.Ext:
        import torch

        if not isinstance(obj, torch.Tensor):
            raise TypeError(f"cannot encode a {type(obj).__name__} inside a {type(msg).__name__}")
        handle = link.share(obj) if link is not None else None
        if handle is not None:
            return msgspec.msgpack.Ext(_SHARED_EXT, _ref_encoder.encode(handle))
        frames.append(_tensor_bytes(obj))
        ref = _TensorRef(len(frames) - 1, str(obj.dtype).removeprefix("torch."), list(obj.shape))
        return msgspec.msgpack.Ext(_TENSOR_EXT, _ref_encoder.encode(ref))

    frames[1] = msgspec.msgpack.Encoder(enc_hook=tensor_to_ref).encode(msg)
    return frames


def decode(frames: Sequence[Any]) -> WireMessage | msgspec.Struct:
    """The message in `frames` (`zmq.Frame`s from `recv_multipart(copy=False)`, or any byte buffers); its tensors
    alias the frames' memory (or shared memory). Raises WireError when the frames are not a message `encode` could
    have produced, TensorLost when one of its shared-memory tensors cannot be had."""
    if len(frames) < 2:
        raise WireError(f"a message has at least 2 frames (type, struct), got {len(frames)}")
    head = _buffer(frames[0])
    if head.nbytes != 1 or head[0] not in _STRUCT_TYPES:
        raise WireError(f"frame 0 must be one byte in {[int(t) for t in FrameType]}, got {bytes(head[:8])!r}")
    frame_type = FrameType(head[0])
    referenced: set[int] = set()
    lost: list[str] = []

    def ref_to_tensor(code: int, data: memoryview) -> torch.Tensor | None:
        if code == _SHARED_EXT:
            return _shared_tensor(data, lost)
        if code != _TENSOR_EXT:
            raise WireError(f"unknown msgpack extension type {code} in a {frame_type.name} message")
        try:
            ref = _ref_decoder.decode(data)
        except msgspec.DecodeError as error:
            raise WireError(f"malformed tensor reference: {error}") from None
        if not 2 <= ref.frame < len(frames) or ref.frame in referenced:
            raise WireError(f"tensor reference to frame {ref.frame}: missing or used twice ({len(frames)} frames)")
        referenced.add(ref.frame)
        return _tensor(ref, _buffer(frames[ref.frame]))

    decoder = msgspec.msgpack.Decoder(_STRUCT_TYPES[frame_type], ext_hook=ref_to_tensor)
    try:
        msg = decoder.decode(_buffer(frames[1]))
    except msgspec.DecodeError as error:
        raise WireError(f"frame 1 is not a valid {frame_type.name} struct: {error}") from None
    if len(referenced) != len(frames) - 2:
        raise WireError(f"{len(frames) - 2 - len(referenced)} tensor frame(s) that no field references")
    if lost:
        raise TensorLost("; ".join(lost), msg)
    return msg


def _shared_tensor(data: memoryview, lost: list[str]) -> torch.Tensor | None:
    """The tensor a shared-memory handle names; None (the problem noted in `lost`) when it cannot be had."""
    try:
        return shared_memory.tensor_of(_handle_decoder.decode(data))
    except msgspec.DecodeError as error:
        raise WireError(f"malformed shared-memory handle: {error}") from None
    except SegmentError as error:
        lost.append(str(error))
        return None


def _buffer(frame: Any) -> memoryview:
    """A frame's bytes without a copy: a `zmq.Frame`'s `buffer`, or the buffer itself."""
    return memoryview(getattr(frame, "buffer", frame))


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of the tensor's memory: no copy for a contiguous CPU tensor (the usual case); a strided or
    device tensor is made contiguous on the host first, and the view keeps that copy alive until ZeroMQ is done."""
    import torch

    host = tensor.detach().cpu().contiguous()
    return memoryview(host.reshape(-1).view(torch.uint8).numpy())  # [nbytes]


def _tensor(ref: _TensorRef, buffer: memoryview) -> torch.Tensor:
    """The tensor `ref` describes, over `buffer` (copied first only when the buffer is read-only)."""
    import torch

    dtype = getattr(torch, ref.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise WireError(f"tensor frame {ref.frame}: unknown dtype {ref.dtype!r}")
    if any(n < 0 for n in ref.shape):
        raise WireError(f"tensor frame {ref.frame}: negative shape {ref.shape}")
    expected = math.prod(ref.shape) * dtype.itemsize
    if buffer.nbytes != expected:
        raise WireError(
            f"tensor frame {ref.frame} holds {buffer.nbytes} bytes; a {ref.dtype} tensor of shape {ref.shape} "
            f"needs {expected}"
        )
    if expected == 0:
        return torch.empty(ref.shape, dtype=dtype)
    if buffer.readonly:
        buffer = memoryview(bytearray(buffer))
    return torch.frombuffer(buffer, dtype=dtype).view(ref.shape)
