"""The wire format: every message type survives encode → ZeroMQ → decode, tensors travel as frames without a copy on
either side, and malformed frames fail with a WireError that names the problem."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch
import zmq

from sagellm.runtime.comm.wire import End, FrameType, Heartbeat, Ready, WireError, decode, encode
from sagellm.runtime.engine.outputs import RequestMetrics, TokenLogprob
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.pipeline.messages import KVBlocks, PrefillDone, Request, RequestError, TokenDelta

KV_SHAPE = (30, 2, 64, 3, 64)  # [layers, k/v, tokens, kv heads, head_dim]: SmolLM2, 64 tokens


@pytest.fixture
def pair():
    """A connected PAIR over inproc://: real received `zmq.Frame`s, as the executor gets them."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://wire-test")
    b.connect("inproc://wire-test")
    yield a, b
    ctx.destroy(linger=0)


def transmit(pair, frames: list) -> list[zmq.Frame]:
    a, b = pair
    a.send_multipart(frames, copy=False)
    return b.recv_multipart(copy=False)


def address(buffer) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def prefill_done(kv: torch.Tensor) -> PrefillDone:
    request = Request(request_id="r1", prompt_token_ids=list(range(64)), sampling=SamplingParams(max_tokens=8))
    return PrefillDone(
        request_id="r1",
        request=request,
        first_token=7,
        first_token_time=123.5,
        kv=KVBlocks(num_tokens=64, data=kv),
        num_cached_tokens=16,
        first_logprob=TokenLogprob(token_id=7, logprob=-0.25, top=[(7, -0.25), (3, -1.5)]),
    )


def test_prefill_done_kv_travels_as_a_frame_without_copies(pair) -> None:
    kv = torch.randn(KV_SHAPE)  # [30, 2, 64, 3, 64]
    sent = prefill_done(kv)
    frames = encode(sent)
    assert len(frames) == 3 and frames[0] == bytes([FrameType.DATA])
    assert address(frames[2]) == kv.data_ptr()  # the sent frame is the tensor's own memory

    received = transmit(pair, frames)
    msg = decode(received)

    assert isinstance(msg, PrefillDone)
    assert msg.request == sent.request
    assert (msg.first_token, msg.first_token_time, msg.num_cached_tokens) == (7, 123.5, 16)
    assert msg.first_logprob == sent.first_logprob
    data = msg.kv.data
    assert msg.kv.num_tokens == 64 and data.shape == KV_SHAPE and data.dtype == torch.float32
    assert torch.equal(data, kv)
    assert data.data_ptr() == address(received[2].buffer)  # the decoded tensor is the received frame: no copy
    data[0, 0, 0, 0, 0] = 42.0  # writable, and it writes into the frame it aliases
    assert np.frombuffer(received[2].buffer, dtype=np.float32)[0] == 42.0


@pytest.mark.parametrize(
    "msg",
    [
        Request(request_id="a", prompt="hi", priority=2, user="u", ttft_slo_ms=500.0, deadline=9.5, phase="prefill"),
        TokenDelta(
            request_id="b",
            token_ids=[1, 2],
            text="ab",
            finish_reason="stop",
            logprobs=[TokenLogprob(token_id=1, logprob=-0.1), TokenLogprob(token_id=2, logprob=-0.2, top=[(2, -0.2)])],
            metrics=RequestMetrics(arrival_time=1.0, first_token_time=1.1, num_output_tokens=2, slo_met=True),
        ),
        RequestError(request_id="c", code="instance_lost", message="decode-0 stopped heartbeating", retryable=True),
        Ready(node="prefill-0", pid=4242, info={"endpoint": "ipc:///tmp/x", "threads": 2}),
        Heartbeat(node="decode-0", time=1.5, stats={"decode-0": {"running": 3, "healthy": True, "tokens_per_s": 9.5}}),
        End(node="route"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_message_type_round_trips(pair, msg) -> None:
    frames = encode(msg)
    assert len(frames) == 2
    assert decode(transmit(pair, frames)) == msg


def test_control_frame_types() -> None:
    assert [encode(m)[0] for m in (Ready(node="n", pid=1), Heartbeat(node="n", time=0.0), End(node="n"))] == [
        bytes([FrameType.READY]),
        bytes([FrameType.HEARTBEAT]),
        bytes([FrameType.END]),
    ]


def test_odd_tensors_round_trip(pair) -> None:
    """Strided, bfloat16 (which numpy lacks), empty and 0-dim tensors; several tensors in one message."""
    strided = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()  # [6, 4], not contiguous
    tensors = {
        "strided": strided,
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "empty": torch.zeros(0, 3, dtype=torch.int64),
        "scalar": torch.tensor(7, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
    }
    frames = encode(Heartbeat(node="n", time=0.0, stats={"t": tensors}))
    assert len(frames) == 2 + len(tensors)
    got = decode(transmit(pair, frames)).stats["t"]
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_read_only_frames_are_copied_so_the_tensor_is_writable(recwarn) -> None:
    kv = torch.randn(2, 2, 4, 1, 8)
    frames = [bytes(f) for f in encode(prefill_done(kv))]  # bytes: read-only buffers
    data = decode(frames).kv.data
    data.zero_()
    assert torch.equal(decode(frames).kv.data, kv)  # the bytes were not written
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_encode_rejects_what_the_wire_cannot_carry() -> None:
    with pytest.raises(TypeError, match="cannot send a dict"):
        encode({"request_id": "x"})
    with pytest.raises(TypeError, match="cannot encode a object inside a PrefillDone"):
        encode(prefill_done(object()))


def crafted(ref: list, code: int = 1) -> list[bytes]:
    """A PrefillDone whose KV field is a hand-made tensor reference."""
    msg = prefill_done(msgspec.msgpack.Ext(code, msgspec.msgpack.encode(ref)))
    return [*encode(msg), b"\0" * 16]


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ([], "at least 2 frames"),
        ([bytes([FrameType.DATA])], "at least 2 frames"),
        ([b"\x0f", b"\x90"], "frame 0 must be one byte"),
        ([b"\x01\x01", b"\x90"], "frame 0 must be one byte"),
        ([bytes([FrameType.DATA]), b"\xc1garbage"], "frame 1 is not a valid DATA struct"),
        ([bytes([FrameType.END]), msgspec.msgpack.encode([1])], "frame 1 is not a valid END struct"),
        ([bytes([FrameType.DATA]), encode(Ready(node="n", pid=1))[1]], "frame 1 is not a valid DATA struct"),
        (crafted([2, "float32", [4]]), None),  # well formed: 16 bytes are 4 float32s
        (crafted([2, "float32", [5]]), "holds 16 bytes; a float32 tensor of shape \\[5\\] needs 20"),
        (crafted([2, "nonsense", [4]]), "unknown dtype 'nonsense'"),
        (crafted([2, "float32", [-4]]), "negative shape"),
        (crafted([3, "float32", [4]]), "reference to frame 3: missing"),
        (crafted([1, "float32", [4]]), "reference to frame 1: missing"),
        (crafted(["x"]), "malformed tensor reference"),
        (crafted([2, "float32", [4]], code=7), "unknown msgpack extension type 7"),
        ([*encode(End(node="n")), b"stray"], "1 tensor frame\\(s\\) that no field references"),
    ],
)
def test_malformed_messages_raise_wire_error(frames: list[bytes], error: str | None) -> None:
    if error is None:
        assert decode(frames).kv.data.shape == (4,)
        return
    with pytest.raises(WireError, match=error):
        decode(frames)


def test_a_missing_tensor_frame_is_reported() -> None:
    frames = encode(prefill_done(torch.ones(2, 2, 1, 1, 4)))
    with pytest.raises(WireError, match="reference to frame 2: missing"):
        decode(frames[:2])
    frames[2] = memoryview(bytes(frames[2])[:-4])
    with pytest.raises(WireError, match="holds 60 bytes"):
        decode(frames)
