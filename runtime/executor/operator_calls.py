"""How every host of an operator calls it, whatever runs the host (the executor's trio tasks, the SAGE adapter's
threads): one item through a map's logic, one engine step, one item served by a stream to its one terminal.

These are the operator contract's rules that hold everywhere: an item the operator does not accept passes through;
an operator's exception becomes an `internal` RequestError for the item (for a Step operator, for every request it
held, and the engine serves on); a stream that stops without a terminal item ends with one all the same."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from sagellm.common import tracing
from sagellm.runtime.pipeline.messages import RequestError, is_terminal
from sagellm.runtime.pipeline.operator import Operator, StepOperator, StreamOperator

log = structlog.get_logger("sagellm.executor")


def apply_operator(node_id: str, op: Operator, fn: Callable[[Any], Any], item: Any) -> list[Any]:
    """Runs operator logic (`fn`, one of `op`'s methods) on one item: items the operator does not accept pass
    through; an exception becomes the item's `internal` error (logged); None means nothing."""
    if op.accepts and not isinstance(item, op.accepts):
        return [item]
    trace = getattr(item, "trace", None) if op.traced else None
    started = time.time() if trace is not None else 0.0
    try:
        result = fn(item)
    except Exception as exc:
        log.exception("operator_failed", node=node_id, request_id=getattr(item, "request_id", None))
        rid = getattr(item, "request_id", None)
        return [internal_error(rid, node_id, exc)] if rid is not None else []
    if trace is not None and not isinstance(op, StepOperator):  # (an engine records its spans as they end)
        tracing.record(op.name, trace, started, time.time(), {"sagellm.node": node_id})
    if result is None:
        return []
    return result if isinstance(result, list) else [result]


def step_once(node_id: str, op: StepOperator) -> list[Any]:
    """One engine step's outputs; a failed step ends the requests the engine held with an `internal` error, and the
    engine serves on."""
    try:
        return op.step()
    except Exception as exc:
        held = op.in_flight()
        log.exception("step_failed", node=node_id, requests=len(held))
        op.abort(held)
        return [internal_error(rid, node_id, exc) for rid in held]


async def serve_item(
    node_id: str,
    op: StreamOperator,
    item: Any,
    send: Callable[[Any], Awaitable[Any]],
    cancelled: Callable[[], bool] = lambda: False,
) -> bool:
    """Sends on what `op.serve(item)` yields, then makes sure the item ended: a stream that stopped without a terminal
    (or raised) ends with an `internal` error, unless `cancelled()` says its client left. Returns whether the item
    ended (False: cancelled, for the caller to end as it ends cancelled requests)."""
    rid, ended = item.request_id, False
    try:
        async with contextlib.aclosing(op.serve(item)) as outputs:
            async for out in outputs:
                await send(out)
                ended = ended or is_terminal(out)
    except Exception as exc:
        log.exception("operator_failed", node=node_id, request_id=rid)
        if not ended:
            await send(internal_error(rid, node_id, exc))
            return True
    if not ended and not cancelled():
        await send(internal_error(rid, node_id, "the stream ended without a result"))
        return True
    return ended


def internal_error(request_id: str, node_id: str, problem: object) -> RequestError:
    return RequestError(request_id=request_id, code="internal", message=f"{node_id}: {problem}")
