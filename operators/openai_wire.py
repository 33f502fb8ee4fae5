"""Our requests in the OpenAI wire format, and an OpenAI-compatible server's answers back in ours: what the
`remote_engine` operator sends a server (vLLM, llama.cpp, another sageLLM) and how it reads what comes back.

Kept apart from the operator, which owns the instances and the calls themselves, so that the format's details (vLLM's
names for what OpenAI lacks, how a constraint or a chat template is spelled, how a streamed tool call is joined, what
a server's refusal means to our client) live in one place and can be checked without a server."""

from __future__ import annotations

import json
import math
from typing import Any

from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.outputs import RequestMetrics
from sagellm.runtime.pipeline.messages import HTTP_STATUS, ErrorCode, Request, RequestError


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
        return self._close(below=math.inf)

    def _close(self, below: float) -> str:
        done = [index for index in self._open if index < below]
        blocks = [self._open.pop(index) for index in done]
        call = '<tool_call>\n{{"name": {}, "arguments": {}}}\n</tool_call>'
        return "".join(call.format(json.dumps(name), json.dumps(arguments or "{}")) for name, arguments in blocks)


def count_usage(metrics: RequestMetrics, usage: Any) -> None:
    """Takes a stream event's `usage` (if it has one) into the request's metrics: the server's count of the prompt,
    output and cached tokens is the true one, not ours of its events."""
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


def refusal(request: Request, name: str, status: int, content: bytes) -> RequestError:
    """A server's non-200 answer (`content`, its body) as the request's error, keeping its meaning for the client:
    a request the server finds invalid is the client's to fix, in the server's own words; a busy or unreachable
    server is retryable elsewhere; anything else is the instance's failure, named with `name`."""
    message = _error_message(content) or f"HTTP {status}"
    code, retryable = _REFUSALS.get(status, ("unavailable" if status == 404 else "internal", False))
    if code == "invalid_request" and "context length" in message.lower():
        code = "context_length_exceeded"
    if code in ("invalid_request", "context_length_exceeded"):
        return request_error(request, code, message)  # the client's to fix: the server's words
    return request_error(request, code, f"instance {name} answered {status}: {message}", retryable=retryable)


def streamed_error(request: Request, name: str, error: dict[str, Any]) -> RequestError:
    """An error event in the server's stream: a code of ours keeps its meaning (another sageLLM lost its worker: the
    request may be tried elsewhere), any other is the server's internal failure."""
    code = error.get("code")
    known: ErrorCode = code if code in HTTP_STATUS else "internal"
    retryable = known in ("instance_lost", "unavailable", "timeout")
    return request_error(request, known, f"{name}: {error.get('message')}", retryable=retryable)


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


def request_error(request: Request, code: ErrorCode, message: str, *, retryable: bool = False) -> RequestError:
    """The error that ends `request`: one spelling for every way a call to a server fails, here and in the
    operator that makes the calls."""
    return RequestError(request_id=request.request_id, code=code, message=message, retryable=retryable)
