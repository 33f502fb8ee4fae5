"""Issue 62's fifth item against one served gateway: a constraint no output can meet is a 400 at arrival naming the
field it came in (a schema whose required property is itself, a `$ref` loop, a regex or grammar that matches
nothing); with the request's own restrictions, a 400 before any token naming them (`guided_choice` with
`allowed_token_ids` that share no token with it), or, found only while decoding, the end of that request alone (a 400,
an error event once streamed, or `stop` when the output is whole); never a 500. And the 500s an audit of every user
route found, replayed: a body nested just below the JSON decoder's recursion limit decoded, then failed in the code
that walked it later. After each test, and beside the mistakes, the server answers a plain request exactly as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from sagellm.gateway.http.json_depth import MAX_BODY_DEPTH, nesting_depth
from sagellm.gateway.server import GatewayThread
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow

SELF_REQUIRED = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}  # no finite instance
TOOL_SELF_REQUIRED = {"type": "function", "function": {"name": "f", "parameters": SELF_REQUIRED}}
REF_LOOP = {"$defs": {"x": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"}
A, B = 67, 68  # the tiny tokenizer's tokens for "a" and "b"
PLAIN = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    tmp = tmp_path_factory.mktemp("client-mistakes")
    model = make_tiny_llama(tmp / "tiny-llama", max_position_embeddings=1024)  # room for a prompt that shows tools
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp), model) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway: GatewayThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=REPLY_TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def plain_text(client: httpx.Client) -> str:
    """A greedy completion's text before any mistake: each test checks the server still answers it exactly."""
    return client.post("/v1/completions", json=PLAIN).json()["choices"][0]["text"]


@pytest.fixture(autouse=True)
def serves_exactly_after(client: httpx.Client, plain_text: str) -> Iterator[None]:
    yield
    reply = client.post("/v1/completions", json=PLAIN)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == plain_text, reply.text


def _chat(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **fields}


def _refused(reply: httpx.Response, param: str | None, *words: str) -> dict[str, Any]:
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and all(word in error["message"] for word in words), error
    return error


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": SELF_REQUIRED}}},
         "response_format"),
        ("/v1/chat/completions", {"guided_json": SELF_REQUIRED}, "guided_json"),
        ("/v1/completions", {"structured_outputs": {"json": SELF_REQUIRED}}, "structured_outputs"),
        ("/v1/chat/completions", {"tools": [TOOL_SELF_REQUIRED], "tool_choice": "required"}, "tools"),
    ],
    ids=["response_format", "guided_json", "structured_outputs", "tools"],
)  # fmt: skip
def test_a_schema_whose_required_property_is_itself_is_a_400_naming_its_field(client, path, fields, param) -> None:
    body = {"prompt": "x", "max_tokens": 8, **fields} if path == "/v1/completions" else _chat(**fields)
    _refused(client.post(path, json=body), param, "no finite instance")


@pytest.mark.parametrize(
    "fields",
    [{"guided_json": REF_LOOP}, {"guided_regex": r"[^\s\S]"}, {"guided_grammar": 'start: a\na: a "x"\n'}],
    ids=["ref-loop", "empty-regex", "endless-rule"],
)
def test_a_constraint_that_matches_nothing_is_a_400_naming_its_field(client, fields) -> None:
    (field,) = fields
    _refused(client.post("/v1/chat/completions", json=_chat(**fields)), field, "no output can meet it")


def test_a_responses_format_with_a_ref_loop_is_a_400(client) -> None:
    text = {"format": {"type": "json_schema", "name": "x", "schema": REF_LOOP}}
    reply = client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 8, "text": text})
    assert reply.status_code == 400 and "no output can meet it" in reply.json()["error"]["message"], reply.text


@pytest.mark.parametrize("stream", [False, True])
def test_guided_choice_with_disjoint_allowed_token_ids_is_a_400_before_any_token(client, stream) -> None:
    body = _chat(guided_choice=["yes", "no"], allowed_token_ids=[A, B], stream=stream)
    _refused(client.post("/v1/chat/completions", json=body), "allowed_token_ids", "rules out every token")


def test_bad_words_that_rule_out_every_choice_are_a_400_naming_them(client) -> None:
    body = _chat(guided_choice=["yes", "no"], bad_words=["y", "n", "yes", "no"])
    _refused(client.post("/v1/chat/completions", json=body), "bad_words", "rules out every token")


def test_min_tokens_past_a_complete_choice_ends_it_with_stop(client) -> None:
    reply = client.post("/v1/chat/completions", json=_chat(guided_choice=["yes", "no"], min_tokens=6, temperature=0))
    assert reply.status_code == 200, reply.text
    (choice,) = reply.json()["choices"]
    assert choice["message"]["content"] in ("yes", "no") and choice["finish_reason"] == "stop"


def test_a_dead_end_found_while_decoding_ends_that_request_with_a_400(client) -> None:
    """The token "a" may start the regex `ab` and is allowed; "b", which must follow, is not: found at the second."""
    body = {"prompt": "x", "max_tokens": 8, "guided_regex": "ab", "allowed_token_ids": [A]}
    _refused(client.post("/v1/completions", json=body), None, "regex: no token can follow", "allowed_token_ids")
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
        assert streamed.status_code == 200
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["a"]
    assert events[-1]["error"]["type"] == "invalid_request_error", events[-1]


def test_dead_ends_beside_other_requests_leave_them_exact(client, plain_text) -> None:
    """Dead ends found at arrival and while decoding, in the same batches as plain requests: those run on exactly."""
    dead_ends = [
        ("/v1/completions", {"prompt": "x", "max_tokens": 8, "guided_regex": "ab", "allowed_token_ids": [A]}),
        ("/v1/chat/completions", _chat(guided_choice=["yes", "no"], allowed_token_ids=[A, B])),
        ("/v1/chat/completions", _chat(guided_json=SELF_REQUIRED)),
    ] * 3
    with ThreadPoolExecutor(8) as pool:
        plain = [pool.submit(client.post, "/v1/completions", json=PLAIN) for _ in range(6)]
        refused = list(pool.map(lambda case: client.post(case[0], json=case[1]), dead_ends))
    assert [reply.status_code for reply in refused] == [400] * len(dead_ends)
    assert [future.result().json()["choices"][0]["text"] for future in plain] == [plain_text] * 6


def test_a_complete_output_whose_end_is_ruled_out_ends_with_stop(client) -> None:
    """After "a", `a|ab` may end and "b" is not allowed: the output is whole, so it ends there."""
    body = {"prompt": "x", "max_tokens": 8, "guided_regex": "a|ab", "allowed_token_ids": [A]}
    (choice,) = client.post("/v1/completions", json=body).json()["choices"]
    assert choice["text"] == "a" and choice["finish_reason"] == "stop"


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/v1/chat/completions", '{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"guided_json":%s}'),
        ("/v1/completions", '{"prompt":"hi","max_tokens":2,"structured_outputs":{"json":%s}}'),
        ("/v1/chat/completions", '{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"tool_choice":"required",'
                                 '"tools":[{"type":"function","function":{"name":"f","parameters":%s}}]}'),
        ("/v1/chat/completions", '{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,'
                                 '"tools":[{"type":"function","function":{"name":"f","parameters":%s}}]}'),
        ("/v1/responses", '{"input":"hi","max_output_tokens":2,"text":{"format":{"type":"json_schema","name":"x",'
                          '"schema":%s}}}'),
        ("/v1/messages", '{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"tool_choice":{"type":"any"},'
                         '"tools":[{"name":"f","input_schema":%s}]}'),
    ],
    ids=["guided_json", "structured_outputs", "forced-tool", "tool", "responses-format", "messages-tool"],
)  # fmt: skip
def test_a_body_nested_near_the_decoders_limit_is_a_400_not_a_500(client, path, template) -> None:
    """Depths 976 to 984 decoded, then failed deeper in the route (a RecursionError, a 500); 200,000 never decoded."""
    for depth in (MAX_BODY_DEPTH + 1, *range(970, 990, 2), 200_000):
        reply = _post_raw(client, path, template % _nested(depth))
        assert reply.status_code == 400, (depth, reply.text)
        assert f"levels, at most {MAX_BODY_DEPTH}" in reply.text, (depth, reply.text)


def test_a_body_at_the_depth_bound_is_decoded(client) -> None:
    template = '{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"chat_template_kwargs":{"x":%s}}'
    at_bound = _post_raw(client, "/v1/chat/completions", template % _nested(MAX_BODY_DEPTH - 2))  # + body, kwargs
    assert at_bound.status_code == 200, at_bound.text
    over = _post_raw(client, "/v1/chat/completions", template % _nested(MAX_BODY_DEPTH - 1))
    assert over.status_code == 400 and f"too deeply: {MAX_BODY_DEPTH + 1} levels" in over.text, over.text


def _post_raw(client: httpx.Client, path: str, body: str) -> httpx.Response:
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b'{"a": [[1], {"b": []}]}', 4),
        (b'{"a": "[[[{{{", "b": ["]]]"]}', 2),  # brackets in strings do not count
        (b'{"a": "\\\\", "b": [[["x"]]]}', 4),  # an escaped backslash ends no string
        (b'{"a": "\\"[[[[", "b": []}', 2),  # an escaped quote ends none either
    ],
)
def test_depth_is_measured_outside_strings(body: bytes, depth: int) -> None:
    assert nesting_depth(body) == depth
