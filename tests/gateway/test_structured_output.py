"""Structured output through the official `openai` SDK, unchanged, against the default model served colocated and
through the PD graph: `chat.completions.parse` returns a parsed object for twenty output types, whatever the 135M
model would have said unconstrained; vLLM's `guided_*` and `structured_outputs` fields constrain completions and
chats alike; one that cannot end within max_tokens is cut with `length`; the same constrained request gives the same
tokens on both graphs; and a constraint that cannot be used is a 400 naming the field it came in."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.gateway.conftest import assert_refused_chat, sdk_client
from tests.gateway.structured_schemas import CASES

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(900)]
TOKENS: dict[str, list[int]] = {}  # each graph's tokens for the same constrained request


def test_parse_returns_an_object_of_the_asked_type_for_twenty_types(server) -> None:
    sdk = sdk_client(server)

    def parse(case):
        output_type, prompt = case
        reply = sdk.chat.completions.parse(
            model=server.core.model_name,
            messages=[{"role": "user", "content": prompt}],
            response_format=output_type,
            temperature=0,
            max_tokens=400,
        )
        choice = reply.choices[0]
        return output_type, choice.finish_reason, choice.message.parsed

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(parse, CASES))
    for output_type, finish, parsed in results:
        assert finish == "stop" and isinstance(parsed, output_type), (output_type, finish)


def test_vllm_fields_constrain_completions_and_chats(server) -> None:
    sdk = sdk_client(server)
    phone = sdk.completions.create(
        model=server.core.model_name,
        prompt="My phone number is",
        max_tokens=20,
        temperature=0,
        extra_body={"guided_regex": r" \d{3}-\d{4}"},
    )
    assert re.fullmatch(r" \d{3}-\d{4}", phone.choices[0].text)
    choice = sdk.chat.completions.create(
        model=server.core.model_name,
        messages=[{"role": "user", "content": "Is the sky green?"}],
        max_tokens=5,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert choice.choices[0].message.content in ("yes", "no")
    outputs = sdk.chat.completions.create(
        model=server.core.model_name,
        messages=[{"role": "user", "content": "Give me a list of two numbers."}],
        max_tokens=60,
        temperature=0,
        extra_body={"structured_outputs": {"json": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}}},
    )
    numbers = json.loads(outputs.choices[0].message.content)
    assert isinstance(numbers, list) and len(numbers) <= 2 and all(isinstance(n, int) for n in numbers)
    anything = sdk.chat.completions.create(
        model=server.core.model_name,
        messages=[{"role": "user", "content": "Describe yourself in JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert anything.choices[0].finish_reason == "length" or json.loads(anything.choices[0].message.content)


def test_a_constraint_that_cannot_end_within_max_tokens_is_cut_with_length(server) -> None:
    reply = sdk_client(server).completions.create(
        model=server.core.model_name, prompt="Count:", max_tokens=6, temperature=0,
        extra_body={"guided_regex": "(ab){50}"},
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and re.fullmatch(r"(ab)*a?", choice.text)  # what it gave still follows


PERSON = CASES[2][0].model_json_schema()


def constrained_tokens(url: str) -> list[int]:
    body = {
        "messages": [{"role": "user", "content": "Invent a person."}],
        "max_tokens": 60,
        "temperature": 0,
        "return_token_ids": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    }
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["token_ids"]


def test_the_same_constrained_request_gives_the_same_tokens_on_every_graph(server) -> None:
    TOKENS[server.graph] = constrained_tokens(server.url)
    assert len(set(map(tuple, TOKENS.values()))) == 1, TOKENS  # the graph tried second compares with the first


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
         "response_format", "Invalid type: objec"),
        ({"guided_regex": "(ab"}, "guided_regex", "unclosed group"),
        ({"guided_grammar": "root ::= ("}, "guided_grammar", "Expected ')'"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex", "give one"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_object or json_schema"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "disable_any_whitespace"),
        ({"guided_json": {"type": "object"}, "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend",
         "llguidance"),
        ({"structured_outputs": {"json_object": True, "regex": "a"}}, "structured_outputs", "exactly one"),
    ],
)  # fmt: skip
def test_a_constraint_that_cannot_be_used_is_a_400_naming_its_field(server, body, param, words) -> None:
    assert_refused_chat(server, body, param, words)
