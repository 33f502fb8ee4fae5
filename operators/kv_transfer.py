"""The decode side of a KV hand-over: checks what arrived and measures the transfer, before the decode engine
copies the blocks into its own paged cache.

The bytes move on the edge itself: in one process the tensor is passed by reference; between processes it travels
as a zero-copy ZeroMQ frame (`sagellm.runtime.comm.wire`). Placed with the decode worker, this node sees the KV as
the decode worker received it, so a malformed or truncated transfer fails its request here with a clear error, and
counts against the decode instance (pd_split stops choosing PD while transfers into it keep failing)."""

from __future__ import annotations

import time
from typing import Any

import structlog

from sagellm.runtime.pipeline.messages import PrefillDone, RequestError
from sagellm.runtime.pipeline.operator import MapOperator, register_operator

log = structlog.get_logger("sagellm.kv_transfer")


@register_operator
class KVTransfer(MapOperator):
    name = "kv_transfer"
    accepts = (PrefillDone,)

    def __init__(self) -> None:
        self.transfers = 0
        self.bytes = 0
        self.seconds = 0.0  # prefill's first token to arrival here, summed

    def execute(self, item: PrefillDone) -> Any:
        data = item.kv.data
        problem = _check(item)
        target = self.ctx.instances.get(self.ctx.outputs[0]) if self.ctx.outputs else None
        if problem:
            if target is not None:
                target.kv_transfer_failures += 1
            log.warning("kv_transfer_failed", request_id=item.request_id, problem=problem)
            return RequestError(request_id=item.request_id, code="internal", message=f"KV transfer: {problem}")
        if target is not None:
            target.kv_transfer_failures = 0
        self.transfers += 1
        self.bytes += data.numel() * data.element_size()
        self.seconds += max(0.0, time.time() - item.first_token_time)
        return item

    @property
    def gb_per_s(self) -> float | None:
        return self.bytes / self.seconds / 1e9 if self.seconds else None


def _check(item: PrefillDone) -> str | None:
    data, n = item.kv.data, item.request.num_prompt_tokens
    shape = tuple(getattr(data, "shape", ()))
    if len(shape) != 5 or shape[1] != 2:
        return f"expected KV [layers, 2, tokens, kv_heads, head_dim], got shape {shape}"
    # A prompt with images is longer in the engines than here, each image's placeholder repeated for its rows: the
    # decode engine checks the KV against its own expanded prompt.
    if shape[2] != item.kv.num_tokens or (shape[2] != n and not (item.request.images or item.request.audios)):
        return f"KV holds {shape[2]} tokens; the prompt has {n}"
    return None
