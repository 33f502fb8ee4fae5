"""Pooling models on demand (`sagellm serve --model rerank=./cross-encoder --model vectors=./st-model
--max-loaded-models 1`), one API server in front: a directory holding an encoder is loaded as a pooling model (an
engine of `kind: embedding`), listed unloaded until a request names it; the first rerank loads the reranker and ranks
as sentence-transformers' CrossEncoder does; an embedding request for the other model swaps it in (least recently
used out) and its vectors equal the engine's own; Ollama's /api/embed loads it as /v1/embeddings does; embeddings of
the reranker are refused by name once it is loaded to say what it is."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from sagellm.gateway.config import ModelsOnDemand
from sagellm.runtime.embedding import EmbeddingEngine
from tests.embedding.conftest import make_tiny_bert, write_sentence_transformers_files
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config

pytestmark = pytest.mark.slow

QUERY = "the quick brown fox"
DOCUMENTS = ["the lazy dog", "hello world !", "quick quick fox jumps over the lazy brown dog"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pooling-on-demand")
    return {"rerank": str(make_tiny_bert(root / "cross-encoder", seed=1, num_labels=1)),
            "vectors": str(write_sentence_transformers_files(make_tiny_bert(root / "st")))}  # fmt: skip


@pytest.fixture(scope="module")
def gateway(models, tmp_path_factory):
    on_demand = ModelsOnDemand(dict(models), max_loaded=1, idle_unload_s=600)
    config = tiny_config(tmp_path_factory.mktemp("pool"), models_on_demand=on_demand)
    with running_gateway(GRAPHS / "control_plane.yaml", config, api_servers=1) as gw:
        yield gw


def _statuses(url: str) -> dict[str, str]:
    cards = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    return {card["id"]: card["status"]["value"] for card in cards if "status" in card}


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=REPLY_TIMEOUT_S * 3)


def test_pooling_models_load_on_their_first_request_and_swap_least_recently_used(gateway, models) -> None:
    from sentence_transformers import CrossEncoder

    assert gateway.core.readiness.models_on_demand.models["rerank"].spec.kind == "embedding"
    assert _statuses(gateway.url) == {"rerank": "unloaded", "vectors": "unloaded"}
    shown = _post(gateway.url, "/api/show", {"model": "vectors"}).json()
    assert shown["capabilities"] == ["embedding"]  # known for what it is before it loads
    ranked = _post(gateway.url, "/v1/rerank", {"model": "rerank", "query": QUERY, "documents": DOCUMENTS})
    assert ranked.status_code == 200, ranked.text
    expected = CrossEncoder(models["rerank"], device="cpu").predict([(QUERY, d) for d in DOCUMENTS]).tolist()
    scores = {r["index"]: r["relevance_score"] for r in ranked.json()["results"]}
    assert scores == pytest.approx(dict(enumerate(expected)), abs=1e-4)
    assert _statuses(gateway.url) == {"rerank": "loaded", "vectors": "unloaded"}

    refused = _post(gateway.url, "/v1/embeddings", {"model": "rerank", "input": "hi"})
    assert refused.status_code == 400 and "sequence classifier" in refused.json()["error"]["message"]

    texts = ["hello world", "the quick brown fox"]
    embedded = _post(gateway.url, "/v1/embeddings", {"model": "vectors", "input": texts})
    assert embedded.status_code == 200, embedded.text
    vectors = np.asarray([d["embedding"] for d in embedded.json()["data"]])
    assert np.allclose(vectors, EmbeddingEngine(models["vectors"]).embed(texts).embeddings.numpy(), atol=1e-5)
    deadline = time.monotonic() + 60
    while (seen := _statuses(gateway.url)) != {"rerank": "unloaded", "vectors": "loaded"}:
        assert time.monotonic() < deadline, seen  # one loaded at a time: the reranker made room
        time.sleep(0.1)

    ollama = _post(gateway.url, "/api/embed", {"model": "vectors", "input": texts})
    assert ollama.status_code == 200 and np.allclose(np.asarray(ollama.json()["embeddings"]), vectors, atol=1e-6)
