"""Runs the batches: each request line of a batch's input file through the gateway's own route for its endpoint
(`App.handle`, as if a client had sent it: admission, the scheduling policies, routing, failover), at the low
priority class unless the line's body sets another, so live traffic goes first; at most LINES_IN_FLIGHT lines at a
time across every batch. Each result is appended as it comes (batch_store.py); a batch unfinished when the gateway
stopped is taken up again when it starts, from the lines without a result."""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgspec
import structlog
import trio

from sagellm.gateway.batches.batch_store import BatchRecord, BatchStore
from sagellm.gateway.batches.files import FileStore
from sagellm.gateway.http.app import App, EventStream, HttpRequest
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.background import BackgroundTasks

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank")
LINES_IN_FLIGHT = 8  # a batch's requests in the engines at once, every batch together
MAX_LINES = 50_000  # OpenAI's limit of requests in one batch
MAX_ERRORS = 20  # validation errors reported of a bad input file
WINDOW_S = 24 * 3600  # the one completion window OpenAI offers, "24h"
log = structlog.get_logger("sagellm.gateway")


class BatchRunner:
    """Runs each batch as a task of the gateway's `BackgroundTasks`: stopped where it is when the gateway stops,
    taken up again (`resume`) when it starts."""

    def __init__(self, store: BatchStore, files: FileStore, tasks: BackgroundTasks) -> None:
        self.store, self.files, self.tasks = store, files, tasks
        self.app: App | None = None  # the gateway's application, set once it is built
        # The class the lines are sent at: `low` yields to live requests in the engine (yielding.py); `sagellm
        # run-batch`'s gateway serves nobody else, and sends them `normal`.
        self.priority = "low"
        self._limiter = trio.CapacityLimiter(LINES_IN_FLIGHT)
        self._lines: dict[str, trio.CancelScope] = {}  # a running batch's lines: its cancel ends them, not the task

    def resume(self) -> None:
        """Takes up the batches a stopped gateway left unfinished."""
        for record in self.store.unfinished():
            log.info("batch_resumed", batch=record.id, status=record.status)
            self.start(record)

    def create(self, owner: str, file_id: str, endpoint: str, metadata: dict[str, str] | None = None) -> BatchRecord:
        """A new batch of the requests in `owner`'s file `file_id` to `endpoint`, started."""
        now = int(time.time())
        record = BatchRecord(id=f"batch_{secrets.token_hex(12)}", endpoint=endpoint, input_file_id=file_id,
                             completion_window="24h", created_at=now, expires_at=now + WINDOW_S, owner=owner,
                             metadata=metadata)  # fmt: skip
        self.store.save(record)
        self.start(record)
        return record

    def start(self, record: BatchRecord) -> None:
        self.tasks.start(record.id, lambda: self._run(record))

    def cancel(self, record: BatchRecord) -> None:
        """Stops a batch: no line starts after this, the ones running are cancelled, and what is done is kept."""
        if record.status in ("validating", "in_progress"):
            record.moved_to("cancelling")
            self.store.save(record)
        if (lines := self._lines.get(record.id)) is not None:
            lines.cancel()

    async def _run(self, record: BatchRecord) -> None:
        """The batch to its end; a failure of its own (its input file gone, a full disk) fails it, not the
        gateway."""
        try:
            with trio.CancelScope() as lines:  # a cancel of the batch ends its lines; the gateway's stop, all of it
                self._lines[record.id] = lines
                try:
                    if record.status != "cancelling":
                        await self._run_lines(record)
                finally:
                    del self._lines[record.id]
            self._finish(record)
        except Exception as error:
            log.exception("batch_failed", batch=record.id)
            record.errors = [{"code": "server_error", "message": f"the batch stopped: {error}", "param": None,
                              "line": None}]  # fmt: skip
            record.moved_to("failed")
            self.store.save(record)

    async def _run_lines(self, record: BatchRecord) -> None:
        try:
            data = self.files.content(record.input_file_id, record.owner)
        except (ApiError, OSError) as error:
            data, gone = b"", str(error)
        else:
            gone = None
        lines, errors = _parsed(data, record.endpoint)
        if gone is not None:
            errors = [{"code": "file_not_found", "message": gone, "param": "input_file_id", "line": None}]
        if errors:
            record.errors = errors
            record.moved_to("failed")
            self.store.save(record)
            return
        done, record.completed, record.failed = self.store.done(record)
        record.total = len(lines)
        if record.status == "validating":
            record.moved_to("in_progress")
        self.store.save(record)
        async with trio.open_nursery() as nursery:
            for line in lines:
                if line["custom_id"] in done:
                    continue
                await self._limiter.acquire_on_behalf_of((record.id, line["custom_id"]))
                nursery.start_soon(self._run_line, record, line)

    async def _run_line(self, record: BatchRecord, line: dict[str, Any]) -> None:
        try:
            status, body = await self._answer(record, line)
        finally:
            self._limiter.release_on_behalf_of((record.id, line["custom_id"]))
        failed = status != 200
        result = {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": line["custom_id"],
                  "response": {"status_code": status, "request_id": secrets.token_hex(16), "body": body},
                  "error": None}  # fmt: skip
        self.store.append(record, result, failed)
        if failed:
            record.failed += 1
        else:
            record.completed += 1

    async def _answer(self, record: BatchRecord, line: dict[str, Any]) -> tuple[int, Any]:
        """The route's reply to the line's request, sent for the batch's owner at the runner's class. A line its
        owner's key limits refuse (a 429 `rate_limit_exceeded`: its requests or tokens per minute) waits as long
        as the refusal says and goes again: a batch runs within its key's limits, it does not fail on them."""
        assert self.app is not None
        headers = {"content-type": "application/json", "x-request-priority": self.priority}
        request = HttpRequest("POST", line["url"], headers, {}, msgspec.json.encode(line["body"]), owner=record.owner)
        while True:
            reply = await self.app.handle(request, host_checked=True, guarded=False)
            if isinstance(reply, EventStream):  # refused when the batch was read; a route's own stream is a bug
                return 500, {"error": {"message": "the route answered with a stream", "type": "server_error"}}
            body = reply.body if not isinstance(reply.body, bytes) else msgspec.json.decode(reply.body or b"null")
            wait_s = _key_limit_wait_s(reply.status, body, reply.headers)
            if wait_s is None:
                return reply.status, body
            await trio.sleep(wait_s)

    def _finish(self, record: BatchRecord) -> None:
        """The batch's output and error files, and its last status: completed, or cancelled."""
        if record.status == "failed":
            return
        cancelled = record.status == "cancelling"
        record.moved_to("finalizing")
        for failed in (False, True):
            data = self.store.results(record, failed)
            if data:
                name = f"{record.id}_{'error' if failed else 'output'}.jsonl"
                file = self.files.add(record.owner, name, "batch_output", data)
                setattr(record, "error_file_id" if failed else "output_file_id", file.id)
        record.moved_to("cancelled" if cancelled else "completed")
        self.store.save(record)
        log.info("batch_done", batch=record.id, status=record.status, completed=record.completed, failed=record.failed)


def _key_limit_wait_s(status: int, body: Any, headers: list[tuple[bytes, bytes]]) -> float | None:
    """How long to wait before sending again a line its key's limits refused (its Retry-After); None for any other
    reply, which is the line's result."""
    error = body.get("error") if isinstance(body, dict) else None
    if status != 429 or not isinstance(error, dict) or error.get("code") != "rate_limit_exceeded":
        return None
    return float(dict(headers).get(b"retry-after", b"1"))


def _parsed(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The input file's request lines, and OpenAI's validation errors (empty when every line is good): each line a
    JSON object with a unique `custom_id`, `method` POST, `url` the batch's endpoint and an object `body`, not
    streamed."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def bad(number: int, code: str, message: str, param: str | None = None) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append({"code": code, "message": message, "param": param, "line": number})

    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            bad(number, "invalid_json_line", "this line is not valid JSON")
            continue
        if not isinstance(line, dict):
            bad(number, "invalid_request", "a line is a JSON object")
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            bad(number, "missing_required_parameter", "a line needs a custom_id", "custom_id")
        elif custom_id in seen:
            bad(number, "duplicate_custom_id", f"the custom_id {custom_id!r} is on an earlier line too", "custom_id")
        if line.get("method") != "POST":
            bad(number, "invalid_method", "a line's method is POST", "method")
        if line.get("url") != endpoint:
            bad(number, "mismatched_url", f"this batch's lines go to {endpoint}, not {line.get('url')!r}", "url")
        body = line.get("body")
        if not isinstance(body, dict):
            bad(number, "invalid_request", "a line's body is a JSON object", "body")
        elif body.get("stream"):
            bad(number, "invalid_request", "a batch's requests are not streamed", "body.stream")
        seen.add(custom_id if isinstance(custom_id, str) else "")
        lines.append(line)
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "the input file has no request lines", "param": None,
                       "line": None})  # fmt: skip
    if len(lines) > MAX_LINES:
        message = f"at most {MAX_LINES} requests a batch, got {len(lines)}"
        errors.append({"code": "too_many_requests", "message": message, "param": None, "line": None})
    return lines, errors
