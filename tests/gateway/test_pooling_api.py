"""The pooling routes against a gateway serving a tiny random cross-encoder, a decoder reranker (Qwen3-Reranker's
shape), a three-label classifier and an embedding model (`--pooling-model`, beside `-e`), one API server process in
front so the cards cross processes: rerank in Jina's shape (`/rerank`, `/v1/rerank`) and Cohere's (`/v2/rerank`)
equals sentence-transformers' CrossEncoder on the same weights (1e-4), best first, cut to top_n, the decoder's as
the encoder's; `/score` pairs as vLLM does, on a cross-encoder and (cosine similarity) on an embedding model;
`/classify` equals the transformers pipeline; `/pooling` returns the raw output; every client mistake is a 400
naming its field, and the models still serve after."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import torch

from tests.embedding.conftest import make_tiny_bert, make_tiny_reranker, write_sentence_transformers_files
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config

pytestmark = pytest.mark.slow

RERANKER, CLASSIFIER, EMBEDDER, DECODER = "tiny-reranker", "tiny-classifier", "tiny-st", "tiny-qwen3-reranker"
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
QUERY = "the quick brown fox"
DOCUMENTS = ["the lazy dog", "hello world !", "quick quick fox jumps over the lazy brown dog", "café"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pooling")
    return {
        RERANKER: str(make_tiny_bert(root / RERANKER, seed=1, num_labels=1)),
        CLASSIFIER: str(make_tiny_bert(root / CLASSIFIER, seed=2, num_labels=3, id2label=LABELS,
                                       label2id={v: k for k, v in LABELS.items()})),
        EMBEDDER: str(write_sentence_transformers_files(make_tiny_bert(root / EMBEDDER))),
        DECODER: str(make_tiny_reranker(root / DECODER)),
    }  # fmt: skip


@pytest.fixture(scope="module")
def gateway(models, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("pool"), embedding_model=models[EMBEDDER],
                         pooling_models=[models[RERANKER], models[CLASSIFIER], models[DECODER]])  # fmt: skip
    with running_gateway(GRAPHS / "control_plane.yaml", config, api_servers=1) as gw:
        yield gw


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def oracle(models) -> list[float]:
    """sentence-transformers' CrossEncoder on the reranker's weights: each document's score for QUERY."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(models[RERANKER], device="cpu").predict([(QUERY, d) for d in DOCUMENTS]).tolist()


def _post(http: httpx.Client, path: str, body: dict) -> dict:
    reply = http.post(path, json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank"])
def test_rerank_in_jinas_shape_equals_the_cross_encoder(http, oracle, path) -> None:
    body = _post(http, path, {"model": RERANKER, "query": QUERY, "documents": DOCUMENTS})
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -oracle[i])
    assert [r["index"] for r in body["results"]] == order
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(oracle[result["index"]], abs=1e-4)
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
    assert body["model"] == RERANKER and body["usage"]["total_tokens"] > 0
    top = _post(http, path, {"model": RERANKER, "query": QUERY, "documents": [{"text": d} for d in DOCUMENTS],
                             "top_n": 2, "return_documents": False})  # fmt: skip
    assert [r["index"] for r in top["results"]] == order[:2] and "document" not in top["results"][0]


def test_rerank_in_cohere_v2_shape(http, oracle) -> None:
    body = _post(http, "/v2/rerank", {"model": RERANKER, "query": QUERY, "documents": DOCUMENTS, "top_n": 3})
    assert len(body["results"]) == 3 and set(body["results"][0]) == {"index", "relevance_score"}
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(oracle[result["index"]], abs=1e-4)
    assert body["meta"]["billed_units"]["search_units"] == 1 and body["id"]


def test_a_document_past_the_models_length_is_cut_as_the_cross_encoder_cuts_it(http, models) -> None:
    from sentence_transformers import CrossEncoder

    long = " ".join(["quick brown fox jumps over the lazy dog"] * 12)  # ~100 tokens, past the model's 64
    expected = CrossEncoder(models[RERANKER], device="cpu", max_length=64).predict([(QUERY, long), (QUERY, "dog")])
    for path in ("/rerank", "/v2/rerank"):
        body = _post(http, path, {"model": RERANKER, "query": QUERY, "documents": [long, "dog"]})
        scores = {r["index"]: r["relevance_score"] for r in body["results"]}
        assert [scores[0], scores[1]] == pytest.approx(expected.tolist(), abs=1e-4)


def test_cohere_sdk_reranks_unchanged(gateway, oracle) -> None:
    import cohere

    client = cohere.ClientV2(api_key="unused", base_url=gateway.url, timeout=60)
    reply = client.rerank(model=RERANKER, query=QUERY, documents=DOCUMENTS, top_n=2)
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -oracle[i])
    assert [r.index for r in reply.results] == order[:2]
    assert [r.relevance_score for r in reply.results] == pytest.approx([oracle[i] for i in order[:2]], abs=1e-4)


def test_cohere_sdk_cuts_each_document_to_max_tokens_per_doc(gateway, models) -> None:
    """Each document's first N tokens ("dog" is one token here), then the pair as the cross-encoder reads it."""
    import cohere
    from sentence_transformers import CrossEncoder

    documents = ["dog " * 40, "lazy dog", "the quick brown fox jumps"]
    cut = ["dog dog dog dog dog", "lazy dog", "the quick brown fox jumps"]
    expected = CrossEncoder(models[RERANKER], device="cpu", max_length=64).predict([(QUERY, d) for d in cut])
    client = cohere.ClientV2(api_key="unused", base_url=gateway.url, timeout=60)
    reply = client.rerank(model=RERANKER, query=QUERY, documents=documents, max_tokens_per_doc=5)
    assert {r.index: r.relevance_score for r in reply.results} == pytest.approx(dict(enumerate(expected)), abs=1e-4)


def test_score_pairs_as_vllm_does(http, oracle) -> None:
    many = _post(http, "/score", {"model": RERANKER, "text_1": QUERY, "text_2": DOCUMENTS})
    assert [d["score"] for d in many["data"]] == pytest.approx(oracle, abs=1e-4)
    assert many["object"] == "list" and many["data"][0]["object"] == "score"
    pairwise = _post(http, "/v1/score", {"model": RERANKER, "text_1": [QUERY, QUERY], "text_2": DOCUMENTS[:2]})
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(oracle[:2], abs=1e-4)


def test_a_decoder_reranker_ranks_and_scores_as_the_cross_encoder_in_every_shape(http, models) -> None:
    from sentence_transformers import CrossEncoder

    expected = CrossEncoder(models[DECODER], device="cpu").predict([(QUERY, d) for d in DOCUMENTS]).tolist()
    for path in ("/v1/rerank", "/v2/rerank"):
        body = _post(http, path, {"model": DECODER, "query": QUERY, "documents": DOCUMENTS})
        assert [r["index"] for r in body["results"]] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
        assert {r["index"]: r["relevance_score"] for r in body["results"]} == pytest.approx(
            dict(enumerate(expected)), abs=1e-4
        )
    scored = _post(http, "/score", {"model": DECODER, "text_1": QUERY, "text_2": DOCUMENTS})
    assert [d["score"] for d in scored["data"]] == pytest.approx(expected, abs=1e-4)


def test_a_reranker_in_an_engine_of_its_own_ranks_as_one_served_here(gateway, http, models, oracle) -> None:
    """A reranker started as an engine of the gateway (`kind: embedding`, as presets and models on demand start
    pooling models): the gateway reads its card from its files, the API server learns it, and it ranks as the
    cross-encoder does; embeddings of it are refused as of one served here; stopped, it is no longer served."""
    headers = {"authorization": f"Bearer {gateway.gateway.admin_key}"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as admin:
        body = {"model": models[RERANKER], "kind": "embedding", "served_model_name": "engine-reranker"}
        started = admin.post("/v1/management/engines", json=body)
        assert started.status_code == 201, started.text
        engine = f"/v1/management/engines/{started.json()['id']}"
        deadline = time.monotonic() + 120
        while (state := admin.get(engine).json())["state"] not in ("ready", "failed"):
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        assert state["state"] == "ready", state["last_error"]
        rerank = {"model": "engine-reranker", "query": QUERY, "documents": DOCUMENTS}
        deadline = time.monotonic() + 10
        while (reply := http.post("/v1/rerank", json=rerank)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)  # until the API server has the engine's card
        assert reply.status_code == 200, reply.text
        scores = {r["index"]: r["relevance_score"] for r in reply.json()["results"]}
        assert scores == pytest.approx(dict(enumerate(oracle)), abs=1e-4)
        refused = http.post("/v1/embeddings", json={"model": "engine-reranker", "input": "hi"})
        assert refused.status_code == 400 and "sequence classifier" in refused.json()["error"]["message"]
        assert admin.delete(engine).json()["state"] == "stopped"
    deadline = time.monotonic() + 10
    while (gone := http.post("/v1/rerank", json=rerank)).status_code != 404 and time.monotonic() < deadline:
        assert gone.status_code == 503, gone.text  # "no instance serves it any more", until the API server knows
        time.sleep(0.1)
    assert gone.status_code == 404, gone.text


def test_an_embedding_model_scores_by_cosine_similarity(http) -> None:
    scored = _post(http, "/score", {"model": EMBEDDER, "text_1": QUERY, "text_2": DOCUMENTS[:2]})
    vectors = _post(http, "/v1/embeddings", {"model": EMBEDDER, "input": [QUERY, *DOCUMENTS[:2]]})["data"]
    query, *docs = (np.asarray(v["embedding"]) for v in vectors)
    want = [float(query @ d / np.linalg.norm(query) / np.linalg.norm(d)) for d in docs]
    assert [d["score"] for d in scored["data"]] == pytest.approx(want, abs=1e-5)
    ranked = _post(http, "/rerank", {"model": EMBEDDER, "query": QUERY, "documents": DOCUMENTS[:2]})
    assert [r["relevance_score"] for r in ranked["results"]] == pytest.approx(sorted(want, reverse=True), abs=1e-5)


def test_classify_equals_the_transformers_pipeline(http, models) -> None:
    from transformers import pipeline

    body = _post(http, "/classify", {"model": CLASSIFIER, "input": DOCUMENTS})
    classify = pipeline("text-classification", model=models[CLASSIFIER], device="cpu", top_k=None)
    for row, scores in zip(body["data"], classify(DOCUMENTS)):
        theirs = [next(s["score"] for s in scores if s["label"] == LABELS[i]) for i in range(3)]
        assert row["probs"] == pytest.approx(theirs, abs=1e-5) and row["num_classes"] == 3
        assert row["label"] == max(scores, key=lambda s: s["score"])["label"]


def test_pooling_returns_the_raw_output(http) -> None:
    logits = _post(http, "/pooling", {"model": CLASSIFIER, "input": DOCUMENTS[0]})["data"][0]["data"]
    probs = _post(http, "/classify", {"model": CLASSIFIER, "input": DOCUMENTS[0]})["data"][0]["probs"]
    assert torch.tensor(logits).softmax(-1).tolist() == pytest.approx(probs, abs=1e-6)
    vector = _post(http, "/pooling", {"model": EMBEDDER, "input": "hello"})["data"][0]["data"]
    assert vector == pytest.approx(
        _post(http, "/v1/embeddings", {"model": EMBEDDER, "input": "hello"})["data"][0]["embedding"]
    )


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/rerank", {"model": RERANKER, "query": QUERY, "documents": []}, "documents"),
        ("/rerank", {"model": RERANKER, "query": QUERY, "documents": [{"image": "x"}]}, "documents[0]"),
        ("/rerank", {"model": RERANKER, "query": QUERY, "documents": ["a"], "top_n": -1}, "top_n"),
        (
            "/rerank",
            {"model": RERANKER, "query": QUERY, "documents": ["a"], "max_chunks_per_doc": 2},
            "max_chunks_per_doc",
        ),
        (
            "/v2/rerank",
            {"model": RERANKER, "query": QUERY, "documents": ["a"], "return_documents": True},
            "return_documents",
        ),
        (
            "/v2/rerank",
            {"model": RERANKER, "query": QUERY, "documents": ["a"], "max_tokens_per_doc": 0},
            "max_tokens_per_doc",
        ),
        (
            "/v2/rerank",
            {"model": EMBEDDER, "query": QUERY, "documents": ["a"], "max_tokens_per_doc": 4},
            "max_tokens_per_doc",
        ),
        ("/score", {"model": RERANKER, "text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_2"),
        ("/score", {"model": CLASSIFIER, "text_1": "a", "text_2": "b"}, "model"),
        ("/classify", {"model": EMBEDDER, "input": "a"}, "model"),
        ("/v1/embeddings", {"model": RERANKER, "input": "a"}, "model"),
        ("/rerank", {"model": "nope", "query": QUERY, "documents": ["a"]}, None),
    ],
)
def test_client_mistakes_are_400s_naming_the_field(http, path, body, param) -> None:
    reply = http.post(path, json=body)
    assert reply.status_code == (404 if body["model"] == "nope" else 400), reply.text
    error = reply.json()["error"]
    assert error.get("param") == param or param is None, error
    assert _post(http, "/score", {"model": RERANKER, "text_1": QUERY, "text_2": "dog"})["data"]  # still serving
