"""The `remote_engine` operator: the engine instances the control plane attaches at run time, served from one node of
the graph.

An instance here is an OpenAI-compatible server (vLLM, llama.cpp, another sageLLM, a server process the gateway
spawned), or a replica of the graph's own engine in a worker process the gateway keeps, reached through its link
(`InstanceLink`: the request as it is, its items as the engine made them). The control
plane attaches one at run time (`attach`) with the endpoint it is reached at and the model name clients ask for; its
`InstanceStats` names this node, so route chooses among these instances like among engine nodes (with the same
strategies) and names the chosen one in `request.instance`.

To a server, each request is one streamed call: a chat (`messages`, with its `tools` and `tool_choice`) to
/v1/chat/completions, a prompt or token ids to /v1/completions, with the request's sampling settings (vLLM's names for
what OpenAI lacks: top_k, min_p, ...: `openai_wire` spells the call and reads the answer). The server's events become
TokenDeltas with text only (its tool calls written whole into the text as Hermes blocks, `StreamedCalls`, which the
gateway reads back; its token ids are its own vocabulary's), except from an instance of the graph's own model
(`InstanceStats.model` None: a replica with the same tokenizer), which is asked for its token ids too
(`return_token_ids`, vLLM's and ours) so the gateway can resume a request there token for token; its `usage` becomes the
finished request's metrics. An embed request is one call to /v1/embeddings; its vector comes back as an Embedding. The
server's own refusals keep their meaning (its 400 is the client's invalid request, with the server's message); a server
that cannot be reached is `unavailable`, one that drops a stream `instance_lost`, both retryable. A client that leaves
cancels the call, which closes its connection: the server aborts the request. The instance's `running` and expected
decode work are this node's count of its requests there; its `waiting` is the server's own queue, which whoever keeps
the instance reads from the server's metrics.

PD across servers: a request pd_split sends to prefill, at a server attached with the prefill role, runs there with
vLLM's disaggregated-serving protocol and then streams from the decode server route chose for it
(`_disaggregated`); the KV moves between the two servers, never through the gateway."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import httpx
import structlog

from sagellm.common import tracing
from sagellm.common.errors import FieldError, InvalidInput
from sagellm.common.pulse import Pulse
from sagellm.common.sse import sse_data
from sagellm.operators.openai_wire import (
    StreamedCalls,
    count_usage,
    openai_call,
    refusal,
    request_error,
    streamed_error,
)
from sagellm.runtime.engine.outputs import RequestMetrics
from sagellm.runtime.pipeline.messages import Embedding, ErrorCode, Request, RequestError, TokenDelta
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext, StreamOperator, register_operator

log = structlog.get_logger("sagellm.remote_engine")
UNLIMITED = 1 << 30
# What a prefill server is asked to do in vLLM's disaggregated serving: prefill, keep the KV for a decode server
REMOTE_DECODE = {
    "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None, "remote_block_ids": None,
    "remote_host": None, "remote_port": None,
}  # fmt: skip


class InstanceLink(Protocol):
    """An instance reached without HTTP: a replica of the graph's own engine that runs in a worker process the
    control plane keeps (`gateway.control.engine_link`). The request goes as it is (tokenized, every sampling
    setting, logprobs too); its items come back as the engine made them."""

    def stream(self, request: Request) -> AsyncIterator[TokenDelta | RequestError]: ...


@dataclass(frozen=True)
class Endpoint:
    """Where an instance is reached and how it is asked."""

    url: str  # the server's base URL, without /v1
    model: str  # the model's name at the server (what its requests say in `model`)
    api_key: str | None = None
    max_concurrent: int | None = None  # requests sent to it at once; more are refused as overloaded
    link: InstanceLink | None = None  # set: reached through it, not over HTTP


@register_operator
class RemoteEngine(StreamOperator):
    name = "remote_engine"
    accepts = (Request,)
    parameter_help: ClassVar[dict[str, str]] = {
        "connect_timeout_s": "seconds to wait for a connection to an instance before it counts as unreachable",
    }

    def __init__(self, connect_timeout_s: float = 5.0) -> None:
        if not connect_timeout_s > 0:
            raise FieldError("connect_timeout_s", f"connect_timeout_s must be > 0, got {connect_timeout_s}")
        self.connect_timeout_s = connect_timeout_s
        self.endpoints: dict[str, Endpoint] = {}
        self._sent: dict[str, dict[str, int]] = {}  # instance -> its requests here -> their expected output tokens
        self._counted_again = Pulse()  # fired as an instance's count changes: a drain (`until_idle`) looks again
        self._client: httpx.AsyncClient | None = None

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        # No read timeout: a long generation streams for minutes; no pool cap below what admission already bounds.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=self.connect_timeout_s, read=None, write=60.0, pool=60.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def drained(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # -- the instances ----------------------------------------------------------------------------------------------
    def attach(
        self, instance_id: str, model: str, endpoint: Endpoint, *, healthy: bool = True, role: str = "colocated"
    ) -> InstanceStats:
        """Serves a new instance of `model` (the name clients ask for) from this node, as a whole-request engine or
        (`role="embedding"`) an embedding server; returns its stats, which the control plane keeps current."""
        if instance_id in self.ctx.instances:
            raise InvalidInput(f"an instance named {instance_id!r} already exists")
        stats = InstanceStats(
            instance_id,
            role=role,
            node=self.ctx.node_id,
            model=model,
            healthy=healthy,
            max_running=endpoint.max_concurrent or UNLIMITED,
        )
        self.ctx.instances[instance_id] = stats
        self.endpoints[instance_id] = endpoint
        self._sent[instance_id] = {}
        return stats

    def capacity(self) -> int:
        """How many requests it serves at once: what its instances' limits add up to (any without a limit, or none
        attached: no bound), so the policy queue upstream holds the rest, in its order, until one has room."""
        limits = [endpoint.max_concurrent for endpoint in self.endpoints.values()]
        return sum(limits) if limits and None not in limits else UNLIMITED

    def relocate(self, instance_id: str, url: str) -> None:
        """New requests for the instance go to `url`; those streaming from its old address end as it goes."""
        if instance_id in self.endpoints:
            self.endpoints[instance_id] = dataclasses.replace(self.endpoints[instance_id], url=url)

    def detach(self, instance_id: str) -> None:
        """Route no longer sees the instance; requests still streaming from it end at their next event with
        `instance_lost` (retryable: the gateway's failover moves them). A graceful stop detaches once drained."""
        self.ctx.instances.pop(instance_id, None)
        self.endpoints.pop(instance_id, None)
        self._sent.pop(instance_id, None)

    async def until_idle(self, instance_id: str) -> None:
        """Returns once no request counts on the instance (its `running` is 0, or it is gone): woken as its requests
        here end, not polled."""
        while (stats := self.ctx.instances.get(instance_id)) is not None and stats.running:
            await self._counted_again.wait()

    # -- requests ---------------------------------------------------------------------------------------------------
    async def serve(self, item: Request) -> AsyncIterator[TokenDelta | RequestError]:
        name = item.instance or ""
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            yield request_error(
                item, "unavailable", f"instance {name!r} left before the request reached it", retryable=True
            )
            return
        if item.sampling.asks_logprobs and endpoint.link is None:  # the server's vocabulary: not ours to name
            yield request_error(
                item, "invalid_request", f"logprobs are not relayed from {name}, a server reached over HTTP"
            )
            return
        if item.sampling.asks_logprobs and item.model is not None:  # named in another model's vocabulary
            yield request_error(
                item, "invalid_request", f"logprobs are served for the gateway's own model, not {item.model}"
            )
            return
        sent = self._sent[name]
        if endpoint.max_concurrent is not None and len(sent) >= endpoint.max_concurrent:
            message = f"instance {name} is at its limit of {endpoint.max_concurrent} requests in flight"
            yield request_error(item, "overloaded", message, retryable=True)
            return
        if endpoint.link is None and item.phase == "prefill":  # counted on each server while there
            async for out in self._disaggregated(name, endpoint, item):
                yield out
            return
        with self._counted(name, item):
            if endpoint.link is not None:
                call = endpoint.link.stream(item)
            else:
                call = self._embed(name, endpoint, item) if item.phase == "embed" else self._call(name, endpoint, item)
            async for out in call:
                yield out

    @contextlib.contextmanager
    def _counted(self, name: str, request: Request) -> Iterator[None]:
        """The request counts on the instance while this lasts (its running requests, its expected decode work)."""
        sent, endpoint = self._sent[name], self.endpoints[name]
        sent[request.request_id] = request.sampling.expected_output_tokens
        self._report(name, endpoint, sent)
        try:
            yield
        finally:
            sent.pop(request.request_id, None)
            self._report(name, endpoint, sent)

    async def _disaggregated(
        self, name: str, endpoint: Endpoint, request: Request
    ) -> AsyncIterator[TokenDelta | RequestError]:
        """PD across two servers, as vLLM's disaggregation proxy runs it: the prefill server computes the prompt's KV
        (one token, `kv_transfer_params: {"do_remote_decode": true}`, not streamed) and answers where the KV waits;
        the decode server is then sent the request with those params, fetches the KV and streams the output. From
        the decode call on, the request is the decode server's (`request.instance`): its failure is that server's."""
        with self._counted(name, request):
            params = await self._prefill(name, endpoint, request)
        if isinstance(params, RequestError):
            yield params
            return
        decoder = request.decode_instance or ""
        if decoder not in self.endpoints:
            yield request_error(
                request, "unavailable", f"decode server {decoder!r} left before the request reached it", retryable=True
            )
            return
        request.instance = decoder
        with self._counted(decoder, request):
            async for out in self._call(decoder, self.endpoints[decoder], request, kv_transfer_params=params):
                yield out

    async def _prefill(self, name: str, endpoint: Endpoint, request: Request) -> dict[str, Any] | RequestError:
        """The prefill server's half: its reply's `kv_transfer_params`, or the request's error."""
        path, body = openai_call(request, endpoint.model)
        body.update(stream=False, max_tokens=1, kv_transfer_params=dict(REMOTE_DECODE))
        body.pop("stream_options", None)
        try:
            async with _upstream_call(name, endpoint, request, path) as headers:
                reply = await self._client.post(endpoint.url + path, json=body, headers=headers)
            if reply.status_code != 200:
                return refusal(request, name, reply.status_code, reply.content)
            params = reply.json().get("kv_transfer_params")
        except (httpx.HTTPError, ValueError) as exc:
            return request_error(
                request, "unavailable", f"prefill server {name} at {endpoint.url}: {_reason(exc)}", retryable=True
            )
        if not isinstance(params, dict):
            message = f"prefill server {name} answered without kv_transfer_params: is it serving with a KV connector?"
            return request_error(request, "unavailable", message, retryable=True)
        return params

    def _report(self, name: str, endpoint: Endpoint, sent: dict[str, int]) -> None:
        self._counted_again.fire()
        stats = self.ctx.instances.get(name)
        if stats is None:
            return
        stats.running = len(sent)
        if endpoint.link is None:  # (a linked engine's queued work comes from its worker's heartbeats)
            stats.queued_prefill_tokens = 0  # the server's to know; route's estimate gives way to what is known
            stats.queued_decode_tokens = sum(sent.values())

    async def _call(
        self, name: str, endpoint: Endpoint, request: Request, kv_transfer_params: dict[str, Any] | None = None
    ) -> AsyncIterator[TokenDelta | RequestError]:
        stats = self.ctx.instances.get(name)
        ours = stats is not None and stats.model is None  # the graph's vocabulary: its token ids mean ours
        path, body = openai_call(request, endpoint.model, return_token_ids=ours)
        if kv_transfer_params is not None:
            body["kv_transfer_params"] = kv_transfer_params
        metrics = RequestMetrics(arrival_time=request.arrival_time, first_scheduled_time=request.dispatched_time)
        chunks, finish, stop, calls = 0, None, None, StreamedCalls()
        try:
            async with (
                _upstream_call(name, endpoint, request, path) as headers,
                self._client.stream("POST", endpoint.url + path, json=body, headers=headers) as reply,
            ):
                if reply.status_code != 200:
                    yield refusal(request, name, reply.status_code, await reply.aread())
                    return
                async for data in sse_data(reply.aiter_lines()):
                    if data == "[DONE]":
                        break
                    if name not in self.endpoints:  # detached while streaming: a forced stop
                        yield request_error(request, "instance_lost", f"instance {name} was stopped", retryable=True)
                        return
                    chunk = json.loads(data)
                    if isinstance(chunk.get("error"), dict):  # the server failed the request mid-stream
                        yield streamed_error(request, name, chunk["error"])
                        return
                    count_usage(metrics, chunk.get("usage"))
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        text = choice["text"] if "text" in choice else delta.get("content")
                        text = (text or "") + calls.add(delta.get("tool_calls") or ())
                        finish = choice.get("finish_reason") or finish
                        stop = choice.get("stop_reason") or stop  # vLLM's: the stop string or token id
                        ids = [int(t) for t in choice.get("token_ids") or ()] if ours else []
                        if text or ids:
                            chunks += 1
                            metrics.first_token_time = metrics.first_token_time or time.time()
                            yield TokenDelta(request_id=request.request_id, token_ids=ids, text=text or "")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:  # ValueError: bad JSON or a bad token id
            code: ErrorCode = "instance_lost" if chunks else "unavailable"
            yield request_error(request, code, f"instance {name} at {endpoint.url}: {_reason(exc)}", retryable=True)
            return
        if finish is None:
            message = f"instance {name} ended the stream before the request finished"
            yield request_error(request, "instance_lost", message, retryable=True)
            return
        if text := calls.finish():
            yield TokenDelta(request_id=request.request_id, token_ids=[], text=text)
        finish = "stop" if finish == "tool_calls" else finish  # the gateway says tool_calls once it read them
        now = time.time()
        metrics.finished_time = now
        metrics.num_output_tokens = metrics.num_output_tokens or chunks  # servers stream about a token per event
        metrics.slo_met = request.slo_met(metrics)
        yield TokenDelta(
            request_id=request.request_id,
            token_ids=[],
            finish_reason=finish,
            stop_reason=stop,
            time=now,
            metrics=metrics,
        )

    async def _embed(self, name: str, endpoint: Endpoint, request: Request) -> AsyncIterator[Embedding | RequestError]:
        """An embed request: one call to /v1/embeddings, its one vector back."""
        prompt = request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt
        body = {"model": endpoint.model, "input": [prompt], "encoding_format": "float"}
        try:
            async with _upstream_call(name, endpoint, request, "/v1/embeddings") as headers:
                reply = await self._client.post(endpoint.url + "/v1/embeddings", json=body, headers=headers)
            if reply.status_code != 200:
                yield refusal(request, name, reply.status_code, reply.content)
                return
            answer = reply.json()
            vector = [float(x) for x in answer["data"][0]["embedding"]]
            tokens = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            yield request_error(
                request, "unavailable", f"instance {name} at {endpoint.url}: {_reason(exc)}", retryable=True
            )
            return
        now = time.time()
        metrics = RequestMetrics(
            arrival_time=request.arrival_time, first_scheduled_time=request.dispatched_time, first_token_time=now,
            finished_time=now, num_prompt_tokens=tokens,
        )  # fmt: skip
        yield Embedding(request_id=request.request_id, vector=vector, prompt_tokens=tokens, time=now, metrics=metrics)


@contextlib.asynccontextmanager
async def _upstream_call(name: str, endpoint: Endpoint, request: Request, path: str) -> AsyncIterator[dict[str, str]]:
    """The headers of a call to a server: its key, and for a traced request the `traceparent` of the call's span
    (`remote_call`, from the call to its answer's end), under which a server that traces (vLLM with
    `--otlp-traces-endpoint`, another sageLLM) records its own spans of the request."""
    headers = {"authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    if request.trace is None or not tracing.enabled():
        yield headers
        return
    attributes = {"sagellm.instance": name, "server.address": endpoint.url, "url.path": path}
    span = tracing.start("remote_call", request.trace, time.time(), attributes)
    headers["traceparent"] = tracing.traceparent(tracing.context_of(span))
    error = None
    try:
        yield headers
    except Exception as exc:  # (a client that left is not the call's error)
        error = _reason(exc)
        raise
    finally:
        tracing.end(span, time.time(), error=error)


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
