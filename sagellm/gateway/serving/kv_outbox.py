"""The KV this server prefilled for decode servers to fetch: disaggregated serving across servers (vLLM's
`kv_transfer_params`), the prefill server's side.

A request sent with `do_remote_decode` runs its prefill here and its last item carries the prompt's KV; the serving
core puts it here (`put`) under a fresh secret, which the reply names (`remote_request_id`) and which is the only way
to fetch it: whoever knows it holds the capability, as vLLM's KV side channels hold theirs by address. A decode
server fetches it once (`take`); what nobody fetches is dropped after `ttl_s`, and the oldest go first while more
than `max_bytes` wait, so a proxy that dies between the two calls leaks nothing for long."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import structlog

from sagellm.runtime.pipeline.messages import KVBlocks, Prefilled

if TYPE_CHECKING:
    import torch

log = structlog.get_logger("sagellm.kv_outbox")
DTYPES = ("float32", "float16", "bfloat16")  # what a KV payload may hold


class KVPayload(msgspec.Struct, array_like=True):
    """What a decode server fetches: the prompt's tokens, the first token and the KV [layers, 2, tokens, heads, dim]
    as raw bytes, and for a model with recurrent layers (Qwen3.5) their states after the prompt as raw float32
    (msgpack, one body)."""

    prompt_token_ids: list[int]
    first_token: int
    dtype: str
    shape: list[int]
    data: bytearray  # decoded writable, so the tensor over it needs no copy (encoded from a memoryview: no copy)
    states: bytearray | None = None  # flat float32 (ModelRunner.read_states)

    @classmethod
    def of(
        cls, prompt_token_ids: list[int], first_token: int, kv: torch.Tensor, states: torch.Tensor | None = None
    ) -> KVPayload:
        import torch  # (here: the gateway's front loads no torch until a KV moves)

        kv = kv.contiguous()
        data = memoryview(kv.view(torch.uint8).reshape(-1).numpy())  # encoded from the tensor's memory, not copied
        flat = None
        if states is not None:
            flat = memoryview(states.to(torch.float32).contiguous().view(torch.uint8).reshape(-1).numpy())
        return cls(list(prompt_token_ids), first_token, str(kv.dtype).removeprefix("torch."), list(kv.shape), data,
                   flat)  # fmt: skip

    def prefilled(self) -> Prefilled:
        """The payload as a request's `Prefilled`; ValueError when it is not a KV tensor."""
        import torch

        if self.dtype not in DTYPES or len(self.shape) != 5 or self.shape[1] != 2:
            raise ValueError(f"not a KV payload: dtype {self.dtype}, shape {self.shape}")
        kv = torch.frombuffer(self.data, dtype=getattr(torch, self.dtype)).reshape(self.shape)
        if self.shape[2] != len(self.prompt_token_ids):
            raise ValueError(f"the KV covers {self.shape[2]} tokens, its prompt has {len(self.prompt_token_ids)}")
        states = None
        if self.states is not None:
            if len(self.states) % 4:
                raise ValueError(f"states of {len(self.states)} bytes are not float32 values")
            states = torch.frombuffer(self.states, dtype=torch.float32) if self.states else torch.zeros(0)
        return Prefilled(
            prompt_token_ids=self.prompt_token_ids,
            first_token=self.first_token,
            kv=KVBlocks(num_tokens=self.shape[2], data=kv, states=states),
        )


@dataclass
class _Waiting:
    payload: bytes
    until: float  # time.monotonic() past which nobody gets it
    request_id: str


class KVOutbox:
    def __init__(self, ttl_s: float = 120.0, max_bytes: int = 2 << 30) -> None:
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._waiting: OrderedDict[str, _Waiting] = OrderedDict()  # by secret, oldest first
        self._of_request: dict[str, str] = {}  # request id -> its secret, until its reply names it
        self._bytes = 0
        self.fetched = 0  # payloads taken by decode servers (a count the tests and metrics read)

    def put(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token: int,
        kv: torch.Tensor,
        states: torch.Tensor | None = None,
    ) -> None:
        now = time.monotonic()
        while self._waiting and next(iter(self._waiting.values())).until <= now:
            self._drop(next(iter(self._waiting)))
        payload = msgspec.msgpack.encode(KVPayload.of(prompt_token_ids, first_token, kv, states))
        secret = secrets.token_urlsafe(24)
        self._waiting[secret] = _Waiting(payload, now + self.ttl_s, request_id)
        self._of_request[request_id] = secret
        self._bytes += len(payload)
        while self._bytes > self.max_bytes and len(self._waiting) > 1:
            log.warning("kv_outbox_full", max_bytes=self.max_bytes)
            self._drop(next(iter(self._waiting)))

    def claim(self, request_id: str) -> str | None:
        """The secret a request's KV waits under (once: the reply that names it)."""
        return self._of_request.pop(request_id, None)

    def take(self, secret: str) -> bytes | None:
        """The payload (msgpack `KVPayload`), handed out once; None when unknown, taken or expired."""
        waiting = self._waiting.get(secret)
        if waiting is None or waiting.until <= time.monotonic():
            return None
        self._drop(secret)
        self.fetched += 1
        return waiting.payload

    def _drop(self, secret: str) -> None:
        waiting = self._waiting.pop(secret)
        self._bytes -= len(waiting.payload)
        if self._of_request.get(waiting.request_id) == secret:
            del self._of_request[waiting.request_id]
