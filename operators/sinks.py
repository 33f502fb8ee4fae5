"""Where replies leave a pipeline: streamed as text to a terminal, or one JSON line per request to a file.

Sinks are terminal: they return None. The executor sees each request's terminal item before handing it to the sink,
so its in-flight accounting does not depend on anything coming out of a sink."""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

import msgspec

from sagellm.common.errors import users_file
from sagellm.runtime.pipeline.messages import RequestError, TokenDelta, is_terminal
from sagellm.runtime.pipeline.operator import MapOperator, OperatorContext, register_operator


@dataclass
class _Reply:
    """Text of one request not yet written, and whether the request has ended."""

    chunks: list[str] = field(default_factory=list)
    started: bool = False  # a TokenDelta arrived (so the id prefix is written)
    line_open: bool = False  # the text so far does not end with a newline (an error or the close must add one)
    done: bool = False

    def add(self, text: str) -> None:
        if text:
            self.chunks.append(text)
            self.line_open = not text.endswith("\n")


@register_operator
class StdoutSink(MapOperator):
    """Streams replies as readable text, one request after another, never interleaved.

    The earliest unfinished request (by first appearance) is written token by token as it arrives; later requests
    are buffered and written when their turn comes, so concurrent replies read like sequential ones while the first
    still streams live. Each reply ends with a newline; an error reads `[request_id] error code: message`."""

    name = "stdout_sink"
    accepts = (TokenDelta, RequestError)
    writes_replies = True
    parameter_help: ClassVar[dict[str, str]] = {"show_ids": "begin each reply with its request id in brackets"}

    def __init__(self, show_ids: bool = False) -> None:
        self.show_ids = show_ids
        self.stream: IO[str] | None = None  # None: sys.stdout at write time (tests assign a StringIO)
        self._replies: OrderedDict[str, _Reply] = OrderedDict()  # in order of first appearance

    def execute(self, item: TokenDelta | RequestError) -> None:
        reply = self._replies.setdefault(item.request_id, _Reply())
        if isinstance(item, RequestError):
            lead = "\n" if reply.line_open else ""
            reply.add(f"{lead}[{item.request_id}] error {item.code}: {item.message}\n")
        else:
            if not reply.started and self.show_ids:
                reply.add(f"[{item.request_id}] ")
            reply.started = True
            reply.add(item.text + ("\n" if item.finished else ""))
        reply.done = is_terminal(item)
        self._write_ready()

    def close(self) -> None:
        """Writes what unfinished requests produced before the pipeline stopped, so no reply text is lost."""
        for reply in self._replies.values():
            reply.done = True
            if reply.line_open:
                reply.add("\n")
        self._write_ready()

    def _write_ready(self) -> None:
        """Writes the head request's pending text; while the head has ended, moves on to the next request."""
        out = self.stream or sys.stdout
        while self._replies:
            request_id, reply = next(iter(self._replies.items()))
            if reply.chunks:
                out.write("".join(reply.chunks))
                out.flush()
                reply.chunks.clear()
            if not reply.done:
                return
            del self._replies[request_id]


class _Record(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One finished request as `jsonl_sink` writes it: the reply so far and either a finish reason or an error."""

    request_id: str
    text: str = ""
    token_ids: list[int] = msgspec.field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None  # when the request asked for them: one per token id
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # ... one per prompt token, None for the first
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None


@register_operator
class JsonlSink(MapOperator):
    """Writes one JSON line per request when it ends (finished or failed), flushed at once so a crash loses nothing
    already finished and `tail -f` shows progress."""

    name = "jsonl_sink"
    accepts = (TokenDelta, RequestError)
    writes_replies = True
    parameter_help: ClassVar[dict[str, str]] = {"path": "the JSON-lines file written (its folder is made)"}

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        self._pending: dict[str, tuple[_Record, list[str]]] = {}  # request id -> its record so far, its text pieces

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        with users_file(self.path, "write the results"):
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")  # noqa: SIM115  (closed in close(): the file outlives this call)

    def execute(self, item: TokenDelta | RequestError) -> None:
        pending = self._pending.get(item.request_id)
        if pending is None:
            pending = self._pending[item.request_id] = (_Record(request_id=item.request_id), [])
        record, texts = pending
        if isinstance(item, TokenDelta):
            texts.append(item.text)
            record.token_ids.extend(item.token_ids)
            if item.logprobs is not None:
                if record.logprobs is None:
                    record.logprobs = []
                record.logprobs += [lp.to_dict() for lp in item.logprobs]
            if item.prompt_logprobs is not None:
                record.prompt_logprobs = [lp and lp.to_dict() for lp in item.prompt_logprobs]
        if not is_terminal(item):
            return
        del self._pending[item.request_id]
        record.text = "".join(texts)
        if isinstance(item, TokenDelta):
            record.finish_reason = item.finish_reason
        else:
            record.error = {"code": item.code, "message": item.message, "retryable": item.retryable}
        if item.metrics is not None:
            record.metrics = item.metrics.to_dict()  # RequestMetrics itself encodes as an array
        self._write(record)

    def _write(self, record: _Record) -> None:
        if self._file is None:
            raise RuntimeError(f"jsonl_sink {self.path}: execute() before open()")
        self._file.write(msgspec.json.encode(record) + b"\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
