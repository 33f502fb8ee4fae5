"""vLLM's tokenizer endpoints, the `x-request-id` on every reply, and what the control-plane benchmark needs: admin
routes without a key for a gateway on loopback that opted in (`admin_auth="loopback"`), and more names for the
graph's model (vLLM's `--served-model-name A B`): one tiny gateway, real HTTP on 127.0.0.1."""

from __future__ import annotations

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from sagellm.gateway.config import GatewayConfig
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("tokenize"), served_model_name="tiny", admin_auth="loopback",
                         model_aliases=["llama-7b", "mistral-7b"])  # fmt: skip
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as gw:
        yield gw


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def post(gateway, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(gateway.url + path, json=body, timeout=REPLY_TIMEOUT_S, **kwargs)


def test_a_prompt_and_a_chat_are_tokenized_as_the_server_tokenizes_them(gateway, tokenizer):
    text = "Hello there, tokenizer"
    reply = post(gateway, "/tokenize", {"model": "tiny", "prompt": text, "return_token_strs": True}).json()
    assert reply["tokens"] == tokenizer.encode(text) and reply["count"] == len(reply["tokens"])
    assert reply["token_strs"] == tokenizer.convert_ids_to_tokens(reply["tokens"]) and reply["max_model_len"] > 0
    bare = post(gateway, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()  # lm-eval's probe
    assert bare["tokens"] == tokenizer.encode(text, add_special_tokens=False) and bare["token_strs"] is None
    messages = [{"role": "user", "content": "What is two plus two?"}]
    counted = post(gateway, "/tokenize", {"messages": messages}).json()["count"]
    chat = post(gateway, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    assert counted == chat["usage"]["prompt_tokens"]  # what the request is charged


def test_detokenize_tokenizer_info_and_version(gateway, tokenizer):
    ids = tokenizer.encode("round trip")
    assert post(gateway, "/detokenize", {"tokens": ids}).json()["prompt"] == tokenizer.decode(ids)
    beyond = post(gateway, "/detokenize", {"tokens": [len(tokenizer) + 5]})
    assert beyond.status_code == 400 and beyond.json()["error"]["param"] == "tokens"
    info = httpx.get(gateway.url + "/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["tokenizer_class"] and info["chat_template"]
    assert not any(key in info for key in ("vocab_file", "merges_file", "tokenizer_file", "name_or_path"))
    assert httpx.get(gateway.url + "/version").json()["version"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ({"model": "no-such-model", "prompt": "a"}, "model"),
        ({"messages": [{"role": "user", "content": "b"}], "continue_final_message": True}, "continue_final_message"),
    ],
)
def test_a_tokenize_request_that_cannot_be_answered_is_a_400_naming_its_field(gateway, body, param):
    reply = post(gateway, "/tokenize", body)
    assert reply.status_code in (400, 404) and reply.json()["error"]["param"] == param, reply.text


def test_every_reply_carries_an_x_request_id(gateway):
    plain = httpx.get(gateway.url + "/v1/models")
    own = httpx.get(gateway.url + "/v1/models", headers={"x-request-id": "my-trace.42"})
    odd = httpx.get(gateway.url + "/v1/models", headers={"x-request-id": "a b;c"})
    missing = httpx.get(gateway.url + "/no/such/route")
    assert len(plain.headers["x-request-id"]) == 32 and own.headers["x-request-id"] == "my-trace.42"
    assert odd.headers["x-request-id"] != "a b;c" and missing.status_code == 404 and missing.headers["x-request-id"]
    body = {"prompt": "Hi", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S) as streamed:
        assert streamed.headers["x-request-id"]
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    assert sdk.completions.create(model="tiny", prompt="Hi", max_tokens=2)._request_id  # the SDK reads it


def test_admin_routes_take_no_key_on_a_loopback_gateway_that_opted_in(gateway):
    switched = post(gateway, "/admin/set_policy", {"policy": "priority"})
    assert switched.status_code == 200, switched.text
    assert httpx.get(gateway.url + "/admin/metrics").status_code == 200
    assert post(gateway, "/admin/set_policy", {"policy": "fifo"}).status_code == 200


@pytest.mark.parametrize(
    ("fields", "words"),
    [({"host": "0.0.0.0"}, "bound to loopback"), ({"api_hub": "0.0.0.0:0"}, "API hub"), ({}, None)],
)
def test_admin_auth_loopback_is_refused_where_callers_could_be_other_hosts(fields, words):
    problem = GatewayConfig(admin_auth="loopback", **fields).admin_auth_problem()
    assert (problem is None) if words is None else (words in problem)
    assert GatewayConfig(admin_auth="nobody").admin_auth_problem() is not None


def test_the_models_aliases_are_answered_and_listed(gateway):
    listed = [card["id"] for card in httpx.get(gateway.url + "/v1/models").json()["data"]]
    assert listed[:3] == ["tiny", "llama-7b", "mistral-7b"]
    chat = {"model": "llama-7b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    reply = post(gateway, "/v1/chat/completions", chat)
    assert reply.status_code == 200 and reply.json()["model"] == "tiny"  # as vLLM: the first name answers
    assert post(gateway, "/v1/chat/completions", {**chat, "model": "llama-13b"}).status_code == 404
