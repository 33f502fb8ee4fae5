"""The `remote_engine` operator: the engine instances the control plane attaches at run time, served from one node of
the graph.

An instance here is an OpenAI-compatible server (vLLM, llama.cpp, another sageLLM, a server process the gateway
spawned), or a replica of the graph's own engine in a worker process the gateway keeps, reached through its link
(`InstanceLink`: the request as it is, its items as the engine made them). The control
plane attaches one at run time (`attach`) with the endpoint it is reached at and the model name clients ask for; its
`InstanceStats` names this node, so route chooses among these instances like among engine nodes (with the same
strategies) and names the chosen one in `request.instance`.

To a server, each request is one streamed call: a chat (`messages`, with its `tools` and `tool_choice`) to
/v1/chat/completions, a prompt or token ids to /v1/completions, with the request's sampling settings (vLLM's names
for what OpenAI lacks: top_k, min_p, ...). The server's events become TokenDeltas with text only (its tool calls
written whole into the text as Hermes blocks, `StreamedCalls`, which the gateway reads back; its token ids are its
own vocabulary's), except from an instance of the graph's own model (`InstanceStats.model` None: a replica with the
same tokenizer), which is asked for its token ids too (`return_token_ids`, vLLM's and ours) so the gateway can resume
a request there token for token; its `usage` becomes the finished request's metrics. An embed request is one call to
/v1/embeddings; its vector comes back as an Embedding. The server's own refusals keep their meaning (its 400 is the
client's invalid request, with the server's message); a server that cannot be reached is `unavailable`, one that
drops a stream `instance_lost`, both retryable. A client that leaves cancels the call, which closes its connection:
the server aborts the request. The instance's `running` and expected decode work are this node's count of its
requests there; its `waiting` is the server's own queue, which whoever keeps the instance reads from the server's
metrics.

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

from sagellm.common.errors import FieldError, InvalidInput
from sagellm.common.pulse import Pulse
from sagellm.common.sse import sse_data
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.outputs import RequestMetrics
from sagellm.runtime.pipeline.messages import HTTP_STATUS, Embedding, ErrorCode, Request, RequestError, TokenDelta
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
        return sum(limits) if limits and None not in limits else 1 << 30

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
            yield _error(item, "unavailable", f"instance {name!r} left before the request reached it", retryable=True)
            return
        if item.sampling.asks_logprobs and endpoint.link is None:  # the server's vocabulary: not ours to name
            yield _error(item, "invalid_request", f"logprobs are not relayed from {name}, a server reached over HTTP")
            return
        if item.sampling.asks_logprobs and item.model is not None:  # named in another model's vocabulary
            yield _error(item, "invalid_request", f"logprobs are served for the gateway's own model, not {item.model}")
            return
        sent = self._sent[name]
        if endpoint.max_concurrent is not None and len(sent) >= endpoint.max_concurrent:
            message = f"instance {name} is at its limit of {endpoint.max_concurrent} requests in flight"
            yield _error(item, "overloaded", message, retryable=True)
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
            yield _error(
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
        headers = {"authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        try:
            reply = await self._client.post(endpoint.url + path, json=body, headers=headers)
            if reply.status_code != 200:
                return _refusal(request, name, reply.status_code, reply.content)
            params = reply.json().get("kv_transfer_params")
        except (httpx.HTTPError, ValueError) as exc:
            return _error(
                request, "unavailable", f"prefill server {name} at {endpoint.url}: {_reason(exc)}", retryable=True
            )
        if not isinstance(params, dict):
            message = f"prefill server {name} answered without kv_transfer_params: is it serving with a KV connector?"
            return _error(request, "unavailable", message, retryable=True)
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
        headers = {"authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        metrics = RequestMetrics(arrival_time=request.arrival_time, first_scheduled_time=request.dispatched_time)
        chunks, finish, stop, calls = 0, None, None, StreamedCalls()
        try:
            async with self._client.stream("POST", endpoint.url + path, json=body, headers=headers) as reply:
                if reply.status_code != 200:
                    yield _refusal(request, name, reply.status_code, await reply.aread())
                    return
                async for data in sse_data(reply.aiter_lines()):
                    if data == "[DONE]":
                        break
                    if name not in self.endpoints:  # detached while streaming: a forced stop
                        yield _error(request, "instance_lost", f"instance {name} was stopped", retryable=True)
                        return
                    chunk = json.loads(data)
                    if isinstance(chunk.get("error"), dict):  # the server failed the request mid-stream
                        yield _streamed_error(request, name, chunk["error"])
                        return
                    _count_usage(metrics, chunk.get("usage"))
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
            yield _error(request, code, f"instance {name} at {endpoint.url}: {_reason(exc)}", retryable=True)
            return
        if finish is None:
            message = f"instance {name} ended the stream before the request finished"
            yield _error(request, "instance_lost", message, retryable=True)
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
        headers = {"authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        prompt = request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt
        body = {"model": endpoint.model, "input": [prompt], "encoding_format": "float"}
        try:
            reply = await self._client.post(endpoint.url + "/v1/embeddings", json=body, headers=headers)
            if reply.status_code != 200:
                yield _refusal(request, name, reply.status_code, reply.content)
                return
            answer = reply.json()
            vector = [float(x) for x in answer["data"][0]["embedding"]]
            tokens = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            yield _error(request, "unavailable", f"instance {name} at {endpoint.url}: {_reason(exc)}", retryable=True)
            return
        now = time.time()
        metrics = RequestMetrics(
            arrival_time=request.arrival_time, first_scheduled_time=request.dispatched_time, first_token_time=now,
            finished_time=now, num_prompt_tokens=tokens,
        )  # fmt: skip
        yield Embedding(request_id=request.request_id, vector=vector, prompt_tokens=tokens, time=now, metrics=metrics)


def openai_call(request: Request, model: str, return_token_ids: bool = False) -> tuple[str, dict[str, Any]]:
    """The path and JSON body that ask an OpenAI-compatible server for `request`, streamed with usage (and the
    output's token ids, if asked: servers that do not know the field ignore it)."""
    s = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": s.temperature,
        "top_p": s.top_p,
    }
    optional = {
        "max_tokens": s.max_tokens,
        "seed": s.seed,
        "stop": s.stop or None,
        "user": request.user,
        "cache_salt": request.cache_salt,  # vLLM's; a server that does not know it ignores it
        # vLLM's (and llama.cpp's) names for what OpenAI's API lacks; sent only when they change something.
        "top_k": s.top_k if s.top_k > 0 else None,
        "min_p": s.min_p or None,
        "stop_token_ids": s.stop_token_ids or None,
        "ignore_eos": s.ignore_eos or None,
        "include_stop_str_in_output": s.include_stop_str_in_output or None,
        "skip_special_tokens": False if not s.skip_special_tokens else None,
        "return_token_ids": return_token_ids or None,
        # OpenAI's penalties and biases (JSON keys are strings), and vLLM's
        "presence_penalty": s.presence_penalty or None,
        "frequency_penalty": s.frequency_penalty or None,
        "logit_bias": {str(token): bias for token, bias in s.logit_bias.items()} if s.logit_bias else None,
        "repetition_penalty": s.repetition_penalty if s.repetition_penalty != 1.0 else None,
        "min_tokens": s.min_tokens or None,
        "bad_words": s.bad_words or None,
        "allowed_token_ids": s.allowed_token_ids,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    if s.guided is not None:
        body.update(_constraint(s.guided))
    if request.messages is not None and request.prompt_token_ids is None:
        tools = {"tools": request.tools, "tool_choice": request.tool_choice} if request.tools else {}
        if tools and request.parallel_tool_calls is not None:
            tools["parallel_tool_calls"] = request.parallel_tool_calls
        return "/v1/chat/completions", {**body, "messages": request.messages, **_template_fields(request)} | {
            key: value for key, value in tools.items() if value is not None
        }
    prompt = request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt
    return "/v1/completions", {**body, "prompt": prompt}


def _template_fields(request: Request) -> dict[str, Any]:
    """A chat's template settings as vLLM's chat request takes them: the generation prompt's two switches on their
    own, the rest as `chat_template_kwargs`."""
    rest = dict(request.template_kwargs or {})
    fields = {name: rest.pop(name) for name in ("add_generation_prompt", "continue_final_message") if name in rest}
    return fields | ({"chat_template_kwargs": rest} if rest else {})


class StreamedCalls:
    """A server's streamed `delta.tool_calls`, each call joined from its fragments (OpenAI's stream sends a call's id
    and name, then its arguments in pieces) and given back whole, as a Hermes block of reply text
    (`<tool_call>{"name", "arguments"}</tool_call>`), once the next call starts or the reply ends: the gateway reads
    calls out of reply text, and its `hermes` parser reads these back."""

    def __init__(self) -> None:
        self._open: dict[int, list[str]] = {}  # index -> [name, arguments so far], in the order they began

    def add(self, fragments: Any) -> str:
        """The text of the calls these fragments show complete (those before a call that starts here)."""
        text = ""
        for fragment in fragments:
            index = int(fragment.get("index", len(self._open)))
            if index not in self._open:
                text += self._close(below=index)
                self._open[index] = ["", ""]
            function = fragment.get("function") or {}
            self._open[index][0] += function.get("name") or ""
            self._open[index][1] += function.get("arguments") or ""
        return text

    def finish(self) -> str:
        """The text of the calls still open when the reply ended."""
        return self._close(below=UNLIMITED)

    def _close(self, below: int) -> str:
        done = [index for index in self._open if index < below]
        blocks = [self._open.pop(index) for index in done]
        call = '<tool_call>\n{{"name": {}, "arguments": {}}}\n</tool_call>'
        return "".join(call.format(json.dumps(name), json.dumps(arguments or "{}")) for name, arguments in blocks)


def _constraint(guided: GuidedDecoding) -> dict[str, Any]:
    """A constraint in the fields OpenAI-compatible servers read: JSON as OpenAI's `response_format` (vLLM and
    llama.cpp both take it), the others as vLLM's `structured_outputs`, a grammar also as llama.cpp's `grammar`."""
    if guided.kind == "json":
        schema = json.loads(guided.json)
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}}
    if guided.kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    constraint = {"structured_outputs": {guided.kind: getattr(guided, guided.kind)}}
    return constraint | ({"grammar": guided.grammar} if guided.kind == "grammar" else {})


def _count_usage(metrics: RequestMetrics, usage: Any) -> None:
    if isinstance(usage, dict):
        metrics.num_prompt_tokens = int(usage.get("prompt_tokens") or 0)
        metrics.num_output_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            metrics.num_cached_tokens = int(details.get("cached_tokens") or 0)


# A server's refusal, by HTTP status, as the request's error: its meaning for the client is kept.
_REFUSALS: dict[int, tuple[ErrorCode, bool]] = {
    400: ("invalid_request", False),
    413: ("invalid_request", False),
    422: ("invalid_request", False),
    429: ("overloaded", True),
    503: ("unavailable", True),
    504: ("timeout", True),
}


def _refusal(request: Request, name: str, status: int, content: bytes) -> RequestError:
    message = _error_message(content) or f"HTTP {status}"
    code, retryable = _REFUSALS.get(status, ("unavailable" if status == 404 else "internal", False))
    if code == "invalid_request" and "context length" in message.lower():
        code = "context_length_exceeded"
    if code in ("invalid_request", "context_length_exceeded"):
        return _error(request, code, message)  # the client's to fix: the server's words
    return _error(request, code, f"instance {name} answered {status}: {message}", retryable=retryable)


def _streamed_error(request: Request, name: str, error: dict[str, Any]) -> RequestError:
    """An error event in the server's stream: a code of ours keeps its meaning (another sageLLM lost its worker: the
    request may be tried elsewhere), any other is the server's internal failure."""
    code = error.get("code")
    known: ErrorCode = code if code in HTTP_STATUS else "internal"
    retryable = known in ("instance_lost", "unavailable", "timeout")
    return _error(request, known, f"{name}: {error.get('message')}", retryable=retryable)


def _error_message(content: bytes) -> str:
    """The message of an OpenAI-style (or FastAPI-style) error body, else its text."""
    try:
        body = json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace").strip()[:500]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])
    return json.dumps(body)[:500]


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _error(request: Request, code: ErrorCode, message: str, *, retryable: bool = False) -> RequestError:
    return RequestError(request_id=request.request_id, code=code, message=message, retryable=retryable)
