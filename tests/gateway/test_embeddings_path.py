"""Embeddings take the graph's path too: the gateway's embedding model is a node beside its engines (a tiny random
BERT in sentence-transformers layout, made here), each input one request through admission, the policy queue and
route to it, counted by the metrics sink. The vectors are the engine's; an input it cannot take fails the request
with that input named; the model is listed with its length."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from sagellm.runtime.embedding import EmbeddingEngine
from tests.embedding.conftest import make_tiny_bert, write_sentence_transformers_files
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return write_sentence_transformers_files(make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-st"))


@pytest.fixture(scope="module")
def gateway(tiny_model, bert, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("embed"), embedding_model=str(bert))
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as gw:
        yield gw


def embedded(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    found = re.search(r'^sagellm:request_success_total\{finished_reason="embedding"\} (\S+)$', text, re.MULTILINE)
    return float(found[1]) if found else 0.0


def test_vectors_come_through_the_graph_and_are_counted(gateway, bert):
    texts = ["hello world", "the quick brown fox", "a"]
    before = embedded(gateway.url)
    reply = httpx.post(gateway.url + "/v1/embeddings", json={"input": texts}, timeout=60).json()
    expected = EmbeddingEngine(bert).embed(texts)
    assert reply["model"] == "tiny-st" and [d["index"] for d in reply["data"]] == [0, 1, 2]
    assert np.allclose([d["embedding"] for d in reply["data"]], expected.embeddings.numpy(), atol=1e-5)
    assert reply["usage"]["prompt_tokens"] == expected.total_tokens
    assert embedded(gateway.url) == before + 3  # one pipeline request per input, each counted
    models = {m["id"]: m for m in httpx.get(gateway.url + "/v1/models").json()["data"]}
    assert models["tiny-st"]["max_model_len"] == EmbeddingEngine(bert).max_length
    assert gateway.core.registry.instances()["embedding"].role == "embedding"


def test_an_input_the_model_cannot_take_is_named(gateway):
    body = {"input": ["fine", "", "also fine"]}
    reply = httpx.post(gateway.url + "/v1/embeddings", json=body, timeout=60)
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "input" and error["message"].startswith("input 1: ")
    long = {"input": ["word " * 5000]}
    reply = httpx.post(gateway.url + "/v1/embeddings", json=long, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
    unknown = httpx.post(gateway.url + "/v1/embeddings", json={"input": "x", "model": "nope"})
    assert unknown.status_code == 404 and "'tiny-st'" in unknown.json()["error"]["message"]
