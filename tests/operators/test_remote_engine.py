"""What the remote_engine operator sends a server, how it reads the server's refusals, how a server's streamed tool
calls come back (the streaming itself runs against real servers in tests/gateway/test_instances.py,
tests/gateway/test_tool_calling.py and tests/chaos/test_failover.py), and that a drain of an instance ends the instant
its last request does (on a virtual clock)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from sagellm.gateway.replies.tool_parsers import FORWARDED_CALLS, parser_for
from sagellm.operators.remote_engine import (
    Endpoint,
    RemoteEngine,
    StreamedCalls,
    _refusal,
    _streamed_error,
    openai_call,
)
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.pipeline.messages import Request, RequestError


def test_a_request_becomes_the_call_an_openai_compatible_server_expects():
    sampling = SamplingParams(max_tokens=8, temperature=0, top_k=5, stop=["\n"], ignore_eos=True)
    chat = Request(request_id="c", messages=[{"role": "user", "content": "hi"}], user="u", sampling=sampling)
    path, body = openai_call(chat, "served-name")
    assert path == "/v1/chat/completions" and body["messages"] == chat.messages and body["model"] == "served-name"
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_k", "stop", "ignore_eos", "user")} == {
        "max_tokens": 8, "temperature": 0, "top_k": 5, "stop": ["\n"], "ignore_eos": True, "user": "u"}  # fmt: skip
    assert "min_p" not in body and "seed" not in body  # extensions only when they change something
    path, body = openai_call(Request(request_id="t", prompt_token_ids=[1, 2, 3]), "m")
    assert path == "/v1/completions" and body["prompt"] == [1, 2, 3]


def test_a_servers_refusal_keeps_its_meaning():
    request = Request(request_id="r", prompt="x")
    vllm_400 = json.dumps({"error": {"message": "This model's maximum context length is 2048 tokens."}}).encode()
    error = _refusal(request, "vllm-1", 400, vllm_400)
    assert (error.code, error.retryable) == ("context_length_exceeded", False) and error.message.startswith("This")
    assert _refusal(request, "a", 422, b'{"detail": "field required"}').message == "field required"
    assert (_refusal(request, "a", 429, b"busy").code, _refusal(request, "a", 429, b"busy").retryable) == (
        "overloaded", True)  # fmt: skip
    assert _refusal(request, "a", 503, b"").code == "unavailable" and _refusal(request, "a", 504, b"").code == "timeout"
    assert _refusal(request, "a", 500, b"boom").code == "internal" and "answered 500: boom" in _refusal(
        request, "a", 500, b"boom").message  # fmt: skip
    lost = _streamed_error(request, "b", {"code": "instance_lost", "message": "worker gone"})
    assert (lost.code, lost.retryable, lost.message) == ("instance_lost", True, "b: worker gone")
    assert _streamed_error(request, "b", {"code": "weird", "message": "?"}).code == "internal"


def test_a_constraint_is_sent_in_the_fields_vllm_and_llama_cpp_read():
    def sent(**guided) -> dict:
        request = Request(request_id="g", prompt="x", sampling=SamplingParams(guided=GuidedDecoding(**guided)))
        return openai_call(request, "m")[1]

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert sent(json=schema)["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": schema}}  # fmt: skip
    assert sent(json_object=True)["response_format"] == {"type": "json_object"}
    assert sent(regex="a+")["structured_outputs"] == {"regex": "a+"}
    assert sent(choice=["y", "n"])["structured_outputs"] == {"choice": ["y", "n"]}
    grammar = sent(grammar='root ::= "a"')
    assert grammar["structured_outputs"] == {"grammar": 'root ::= "a"'} and grammar["grammar"] == 'root ::= "a"'


def test_a_chats_tools_go_to_the_server_and_its_streamed_calls_come_back_whole():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    chat = Request(request_id="c", messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice="required",
                   parallel_tool_calls=False)  # fmt: skip
    body = openai_call(chat, "m")[1]
    assert (body["tools"], body["tool_choice"], body["parallel_tool_calls"]) == (tools, "required", False)
    assert "tools" not in openai_call(Request(request_id="p", messages=chat.messages), "m")[1]

    calls = StreamedCalls()  # as vLLM and llama.cpp stream them: id and name first, then the arguments in pieces
    text = calls.add([{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather"}}])
    text += calls.add([{"index": 0, "function": {"arguments": '{"city": "Pa'}}])
    text += calls.add([{"index": 0, "function": {"arguments": 'ris"}'}}])
    assert text == ""  # the call may go on
    text += calls.add([{"index": 1, "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}])
    assert text.startswith("<tool_call>") and text.count("<tool_call>") == 1  # the first call is whole
    text += calls.finish()
    content, parsed = type(parser_for(FORWARDED_CALLS)).parse(text)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == [("get_weather", {"city": "Paris"}),
                                                                    ("add", {"a": 1, "b": 2})]  # fmt: skip


class SlowLink:
    """An instance reached without HTTP whose requests end `took_s` after they reach it."""

    def __init__(self, took_s: float) -> None:
        self.took_s = took_s

    async def stream(self, request: Request) -> AsyncIterator[RequestError]:
        await trio.sleep(self.took_s)
        yield RequestError(request_id=request.request_id, code="internal", message="done")


def test_a_drain_of_an_instance_ends_the_instant_its_last_request_does():
    async def main() -> float:
        remote = RemoteEngine()
        remote.ctx = SimpleNamespace(instances={}, node_id="remote")  # (what `open` would give it, minus the client)
        remote.attach("e1", "m", Endpoint("", "m", link=SlowLink(1.234)))  # off a 50 ms poll's beat

        async def request() -> None:
            async for _ in remote.serve(Request(request_id="r", prompt="x", instance="e1")):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            await trio.sleep(0.5)
            assert remote.ctx.instances["e1"].running == 1
            await remote.until_idle("e1")
            return trio.current_time()

    drained_at = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert drained_at == pytest.approx(1.234, abs=1e-9)
