"""The access log (`--access-log PATH`): one JSON line a request, as it ends or is refused, for whoever bills,
audits or looks for a slow request afterwards: when, whose key (by its name, never the key), which model, its tokens,
its timings, how it ended and the HTTP status that says so, its retries and its trace id (the trace it belongs to,
when tracing is on). Written by the serving core, where every request ends whichever front end took it; rotated by
size (`PATH.1` ... `PATH.N`, as logrotate names them), so it never fills the disk."""

from __future__ import annotations

import logging
import logging.handlers
import time
from pathlib import Path
from typing import Any

import msgspec

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.request_stream import RequestStream
from sagellm.runtime.pipeline.messages import HTTP_STATUS, Embedding, Request, RequestError, TokenDelta

DEFAULT_MAX_BYTES = 100 * 2**20
DEFAULT_BACKUPS = 5


class AccessLog:
    """Appends the lines to `path`, rotated at `max_bytes` with `backups` older files kept."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                             encoding="utf-8")  # fmt: skip
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def ended(self, stream: RequestStream, key: str | None) -> None:
        """A request whose client got its last item, or left (`stream.outcome` None)."""
        request, outcome = stream.request, stream.outcome
        metrics = outcome.metrics if isinstance(outcome, (TokenDelta, Embedding, RequestError)) else None
        line = _common(request, key)
        line.update(
            status=_status(outcome), outcome=_outcome(outcome), output_tokens=stream.output_tokens,
            retries=stream.retries, instance=stream.attempt.instance,
        )  # fmt: skip
        if isinstance(outcome, TokenDelta):
            line["finish_reason"] = outcome.finish_reason
        if isinstance(outcome, RequestError):
            line["error"] = outcome.code
        if metrics is not None:
            line["prompt_tokens"] = metrics.num_prompt_tokens or line["prompt_tokens"]
            line["cached_tokens"] = metrics.num_cached_tokens
            timings = _timings(metrics).items()
            line.update({name: round(value * 1000, 3) for name, value in timings if value is not None})
        self._write(line)

    def refused(self, requests: list[Request], error: ApiError, key: str | None) -> None:
        """A client's request refused at the door (a limit, overload, a bad prompt), before it entered."""
        line = _common(requests[0], key)
        line.update(status=error.http_status, outcome="refused", error=error.code, prompts=len(requests))
        self._write(line)

    def _write(self, line: dict[str, Any]) -> None:
        text = msgspec.json.encode(line).decode()
        self._handler.handle(logging.LogRecord("sagellm.access", logging.INFO, "", 0, text, None, None))


def _common(request: Request, key: str | None) -> dict[str, Any]:
    return {
        "time": _iso(request.arrival_time), "request_id": request.request_id, "key": key,
        "model": request.model, "prompt_tokens": request.num_prompt_tokens,
        "trace_id": request.trace.trace_id if request.trace is not None else None,
    }  # fmt: skip


def _status(outcome: Any) -> int:
    if isinstance(outcome, RequestError):
        return HTTP_STATUS.get(outcome.code, 500)
    return 200 if outcome is not None else 499  # (nginx's code for a client that closed the connection first)


def _outcome(outcome: Any) -> str:
    if outcome is None:
        return "cancelled"
    return "failed" if isinstance(outcome, RequestError) else "completed"


def _timings(metrics: Any) -> dict[str, float | None]:
    return {"queue_ms": metrics.queue_s, "ttft_ms": metrics.ttft_s, "e2e_ms": metrics.e2e_s}


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"
