"""What the remote_engine operator sends an OpenAI-compatible server, how it reads the server's refusals and how a
server's streamed tool calls come back (`operators/openai_wire.py`); the streaming itself runs against real servers in
tests/gateway/test_instances.py, tests/gateway/test_tool_calling.py and tests/chaos/test_failover.py."""

from __future__ import annotations

import json

from sagellm.gateway.replies.tool_parsers import FORWARDED_CALLS, parser_for
from sagellm.operators.openai_wire import StreamedCalls, openai_call, refusal, streamed_error
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.pipeline.messages import Request


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
    error = refusal(request, "vllm-1", 400, vllm_400)
    assert (error.code, error.retryable) == ("context_length_exceeded", False) and error.message.startswith("This")
    assert refusal(request, "a", 422, b'{"detail": "field required"}').message == "field required"
    assert (refusal(request, "a", 429, b"busy").code, refusal(request, "a", 429, b"busy").retryable) == (
        "overloaded", True)  # fmt: skip
    assert refusal(request, "a", 503, b"").code == "unavailable" and refusal(request, "a", 504, b"").code == "timeout"
    assert refusal(request, "a", 500, b"boom").code == "internal" and "answered 500: boom" in refusal(
        request, "a", 500, b"boom").message  # fmt: skip
    lost = streamed_error(request, "b", {"code": "instance_lost", "message": "worker gone"})
    assert (lost.code, lost.retryable, lost.message) == ("instance_lost", True, "b: worker gone")
    assert streamed_error(request, "b", {"code": "weird", "message": "?"}).code == "internal"


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
