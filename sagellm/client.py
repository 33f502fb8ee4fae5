"""`UnifiedInferenceClient`: one Python client for a sageLLM gateway, wherever it runs.

    client = UnifiedInferenceClient.create()                      # the local gateway (`sagellm gateway start`)
    client = UnifiedInferenceClient.create(control_plane_url="http://host:8000", api_key="sk-...")
    client = UnifiedInferenceClient.create(embedded=True)         # the pipeline in this process
    client.chat([{"role": "user", "content": "Hi"}], max_tokens=32)  -> str
    client.chat_message("Weather in Paris?", tools=[...])        -> {"content": ..., "tool_calls": [...]}
    client.generate("Once upon a time", max_tokens=32)            -> str
    client.embed(["a", "b"])                                      -> list[list[float]]
    for text in client.stream_chat("Hi"): ...                     # async twins: achat, achat_message, agenerate,
                                                                  #   aembed, astream_chat

Every mode speaks the gateway's OpenAI API, so there is one code path: the embedded mode runs the gateway (graph,
engines and all) in a background thread of this process, on a private loopback port with a random API key. Errors are
typed by what went wrong (`RateLimitError` for 429, `ServiceUnavailableError` for 503, ...), a failure after streaming
began is a `StreamError`, and no gateway to talk to is a `GatewayNotFoundError` saying how to start one."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

from sagellm.common.errors import InvalidInput, NotFound, SageLLMError, Unavailable

DEFAULT_LOCAL_URL = "http://127.0.0.1:8000"


class ClientError(SageLLMError):
    """Base of the client's errors (an embedded gateway that did not start is one itself)."""


class GatewayNotFoundError(ClientError, Unavailable):
    """No gateway answers where the client looked."""


class APIError(ClientError):
    """The gateway answered with an error; `status` (its `http_status`), `code` and `param` are OpenAI's fields. The
    subclasses are also the family's kinds their status stands for (a 400 is an InvalidInput, ...)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(f"{status} {code or ''}: {message}".replace(" :", ":"))
        self.http_status, self.message, self.code, self.param = status, message, code, param

    @property
    def status(self) -> int:
        return self.http_status


class BadRequestError(APIError, InvalidInput):
    pass


class AuthenticationError(APIError, InvalidInput):
    pass


class NotFoundError(APIError, NotFound):
    pass


class RateLimitError(APIError, Unavailable):
    pass


class ServiceUnavailableError(APIError, Unavailable):
    pass


class ServerError(APIError):
    pass


class StreamError(APIError):
    """The request failed after its reply began streaming."""


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 413: BadRequestError,
              429: RateLimitError, 503: ServiceUnavailableError}  # fmt: skip


def _api_error(status: int, body: Any, cls: type[APIError] | None = None) -> APIError:
    error = body.get("error", {}) if isinstance(body, dict) else {}
    cls = cls or _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    return cls(status, error.get("message") or str(body), error.get("code"), error.get("param"))


def _messages(messages: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


def _text_of(message: dict[str, Any]) -> str:
    """A reply message's text; a reply of tool calls alone has none to give."""
    if message.get("content") is None and message.get("tool_calls"):
        names = ", ".join(call["function"]["name"] for call in message["tool_calls"])
        raise ClientError(f"the reply is tool calls ({names}), not text: chat_message() returns them")
    return message.get("content") or ""


class UnifiedInferenceClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 600.0) -> None:
        """`base_url`: the gateway's address, with or without the `/v1` that OpenAI clients are given."""
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self._async_args = dict(base_url=self.base_url, headers=headers, timeout=timeout)
        self._embedded: _EmbeddedGateway | None = None

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        control_plane_url: str | None = None,
        *,
        embedded: bool = False,
        api_key: str | None = None,
        timeout: float = 600.0,
        graph: str | Path | None = None,
        model: str | None = None,
        embedding_model: str | None = "default",
        state_dir: Path | None = None,
    ) -> UnifiedInferenceClient:
        """A client for `control_plane_url` (with or without `/v1`); else, with `embedded`, for a gateway started in
        this process on `graph` (default graphs/colocated.yaml) and `model`; else for the local gateway (the one
        `sagellm gateway start` recorded, or 127.0.0.1:8000). `embedding_model=None` serves no embeddings."""
        if embedded:
            gateway = _EmbeddedGateway(graph, model, embedding_model, state_dir)
            client = cls(gateway.url, api_key=gateway.api_key, timeout=timeout)
            client._embedded = gateway
            return client
        url = (control_plane_url or _local_gateway_url(state_dir)).rstrip("/").removesuffix("/v1")
        try:
            httpx.get(url + "/health", timeout=5.0)
        except httpx.HTTPError as exc:
            raise GatewayNotFoundError(
                f"no sageLLM gateway answers at {url} ({exc.__class__.__name__}); start one with "
                "`sagellm gateway start`, or pass control_plane_url=..., or use create(embedded=True)"
            ) from None
        return cls(url, api_key=api_key, timeout=timeout)

    def close(self) -> None:
        self._http.close()
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    def __enter__(self) -> UnifiedInferenceClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # -- calls ----------------------------------------------------------------------------------------------------
    def chat(self, messages: str | list[dict[str, Any]], **params: Any) -> str:
        """The reply's text; `params` are the API's (`max_tokens`, `response_format`, ...). A reply of tool calls has
        none: `chat_message` returns those."""
        return _text_of(self.chat_message(messages, **params))

    def chat_message(self, messages: str | list[dict[str, Any]], **params: Any) -> dict[str, Any]:
        """The reply as the assistant's message: `content`, and `tool_calls` when `params` gave `tools` and the model
        called them (each `{"id", "type": "function", "function": {"name", "arguments"}}`, arguments a JSON text)."""
        body = self._post("/v1/chat/completions", {"messages": _messages(messages), **params})
        return body["choices"][0]["message"]

    def generate(self, prompt: str, **params: Any) -> str:
        return self._post("/v1/completions", {"prompt": prompt, **params})["choices"][0]["text"]

    def embed(self, texts: str | list[str], **params: Any) -> list[list[float]]:
        body = self._post("/v1/embeddings", {"input": texts, **params})
        return [item["embedding"] for item in sorted(body["data"], key=lambda d: d["index"])]

    def stream_chat(self, messages: str | list[dict[str, Any]], **params: Any) -> Iterator[str]:
        body = {"messages": _messages(messages), **params, "stream": True}
        with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise _api_error(response.status_code, _json(response.read()))
            yield from _chat_text(response.iter_lines())

    async def achat(self, messages: str | list[dict[str, Any]], **params: Any) -> str:
        return _text_of(await self.achat_message(messages, **params))

    async def achat_message(self, messages: str | list[dict[str, Any]], **params: Any) -> dict[str, Any]:
        body = await self._apost("/v1/chat/completions", {"messages": _messages(messages), **params})
        return body["choices"][0]["message"]

    async def agenerate(self, prompt: str, **params: Any) -> str:
        return (await self._apost("/v1/completions", {"prompt": prompt, **params}))["choices"][0]["text"]

    async def aembed(self, texts: str | list[str], **params: Any) -> list[list[float]]:
        body = await self._apost("/v1/embeddings", {"input": texts, **params})
        return [item["embedding"] for item in sorted(body["data"], key=lambda d: d["index"])]

    async def astream_chat(self, messages: str | list[dict[str, Any]], **params: Any) -> AsyncIterator[str]:
        body = {"messages": _messages(messages), **params, "stream": True}
        async with (
            httpx.AsyncClient(**self._async_args) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            if response.status_code != 200:
                raise _api_error(response.status_code, _json(await response.aread()))
            async for line in response.aiter_lines():
                for text in _chat_text([line]):
                    yield text

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise GatewayNotFoundError(f"the gateway at {self.base_url} did not answer: {exc}") from None
        return _checked(response)

    async def _apost(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with httpx.AsyncClient(**self._async_args) as http:
            try:
                response = await http.post(path, json=body)
            except httpx.HTTPError as exc:
                raise GatewayNotFoundError(f"the gateway at {self.base_url} did not answer: {exc}") from None
        return _checked(response)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _checked(response: httpx.Response) -> dict[str, Any]:
    body = _json(response.content)
    if response.status_code != 200:
        raise _api_error(response.status_code, body)
    return body


def _chat_text(lines: Any) -> Iterator[str]:
    """Content deltas from SSE lines; an `error` event raises `StreamError`."""
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        if "error" in event:
            raise _api_error(500, event, StreamError)
        for choice in event.get("choices", []):
            text = choice.get("delta", {}).get("content")
            if text:
                yield text


def _local_gateway_url(state_dir: Path | None) -> str:
    from sagellm.common.home import gateway_dir
    from sagellm.gateway.state import read_record

    record = read_record(state_dir or gateway_dir())
    return record.url if record is not None else DEFAULT_LOCAL_URL


class _EmbeddedGateway:
    """The gateway on 127.0.0.1 (a free port) in a daemon thread; a random API key keeps other local processes out."""

    def __init__(self, graph: str | Path | None, model: str | None, embedding_model: str | None, state_dir: Any):
        import tempfile

        from sagellm import graphs
        from sagellm.gateway.config import DEFAULT_GRAPH, GatewayConfig
        from sagellm.gateway.http.auth import new_key
        from sagellm.gateway.server import GatewayThread
        from sagellm.runtime.models.model_cache import DEFAULT_EMBEDDING_MODEL, resolve_model
        from sagellm.runtime.pipeline.yaml_io import load_pipeline

        pipeline = load_pipeline(graphs.find(graph) if graph else DEFAULT_GRAPH)
        if model is not None:
            pipeline.attrs["model"] = str(model)
        embedding = DEFAULT_EMBEDDING_MODEL if embedding_model == "default" else embedding_model
        for name in (pipeline.attrs.get("model"), embedding):
            if name:
                resolve_model(name)
        self.api_key = new_key()
        self._tmp = tempfile.TemporaryDirectory(prefix="sagellm-embedded-") if state_dir is None else None
        config = GatewayConfig(port=0, api_keys=[self.api_key], embedding_model=embedding,
                               state_dir=Path(state_dir or self._tmp.name))  # fmt: skip
        try:
            self.running = GatewayThread(pipeline, config, name="sagellm-embedded")
        except Exception as exc:
            raise ClientError(f"the embedded gateway did not start: {exc}") from exc
        self.url = self.running.url

    def stop(self) -> None:
        self.running.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
