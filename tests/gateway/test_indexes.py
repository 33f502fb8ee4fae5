"""Retrieval indexes on a real gateway (`/admin/index/*`): made for the gateway's embedding model (the real
all-MiniLM-L6-v2), documents chunked and embedded through the serving graph, searched with known questions (the
right document first), chats that name an index answered from it with their sources (the official `openai` SDK,
plain and streamed), and every mistake a clear OpenAI-style error. Generation by a tiny random Llama."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama

CORPUS = Path(__file__).resolve().parents[1] / "rag" / "corpus"
QUESTIONS = {
    "How much money can I spend on food per day during a work trip?": "travel-policy",
    "What kind of water should I give my calathea?": "calathea-care",
    "On which day is the blue recycling bin picked up?": "riverton-recycling",
    "How much is the fine for returning a book late?": "library-borrowing",
}

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Iterator[Path]:
    """The module's SAGELLM_HOME: where its gateways keep their indexes (and fetch all-MiniLM-L6-v2 into)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAGELLM_HOME", str(home := tmp_path_factory.mktemp("indexes-home")))
        yield home


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("long") / "tiny-llama", max_position_embeddings=4096)  # sources fit


@pytest.fixture(scope="module")
def gateway(home, long_model, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("indexes"), embedding_model="all-minilm-l6-v2")
    with running_gateway(GRAPHS / "colocated.yaml", config, long_model) as gw:
        yield gw


def test_an_index_is_made_filled_searched_and_answered_from(gateway, admin) -> None:
    made = admin.post("/admin/index", json={"name": "corpus"})
    assert made.status_code == 201
    assert {k: made.json()[k] for k in ("model", "dim", "chunks")} == {
        "model": "all-minilm-l6-v2",
        "dim": 384,
        "chunks": 0,
    }
    documents = [{"id": path.stem, "text": path.read_text()} for path in sorted(CORPUS.glob("*.md"))]
    added = admin.post("/admin/index/corpus/documents", json={"documents": documents}).json()
    assert added["documents"] == len(documents) and added["chunks"] == sum(added["added"].values()) > len(documents)
    for question, document in QUESTIONS.items():
        hits = admin.post("/admin/index/corpus/query", json={"query": question, "k": 3}).json()["data"]
        assert hits[0]["document_id"] == document, (question, hits[0])  # retrieval precision@1

    client, model = OpenAI(base_url=gateway.url + "/v1", api_key="unused"), gateway.gateway.core.model_name
    question = next(iter(QUESTIONS))
    reply = client.chat.completions.create(
        model=model,
        max_tokens=8,
        messages=[{"role": "user", "content": question}],
        extra_body={"index": "corpus"},
    )
    sources = reply.model_extra["sources"]
    assert reply.choices[0].finish_reason in ("length", "stop") and sources[0]["document_id"] == "travel-policy"
    assert [s["number"] for s in sources] == list(range(1, len(sources) + 1))
    stream = client.chat.completions.create(
        model=model, max_tokens=4, stream=True, messages=[{"role": "user", "content": question}],
        extra_body={"index": "corpus", "index_k": 2},
    )  # fmt: skip
    chunks = list(stream)
    assert len(chunks[0].model_extra["sources"]) <= 2 and chunks[0].model_extra["sources"][0]["number"] == 1

    listed = admin.get("/admin/index").json()["data"]
    assert [i["name"] for i in listed] == ["corpus"]
    assert "calathea-care" in admin.get("/admin/index/corpus").json()["document_ids"]
    removed = admin.delete("/admin/index/corpus/documents/calathea-care").json()
    assert removed["chunks_removed"] > 0
    hits = admin.post("/admin/index/corpus/query", json={"query": "calathea water", "k": 5}).json()["data"]
    assert "calathea-care" not in {h["document_id"] for h in hits}


def test_mistakes_are_clear_errors(gateway, admin) -> None:
    assert httpx.post(gateway.url + "/admin/index", json={"name": "x"}).status_code == 401  # the admin key
    assert admin.post("/admin/index", json={"name": "../up"}).status_code == 400
    assert admin.post("/admin/index", json={"name": "e", "model": "nope"}).json()["error"]["code"] == "model_not_found"
    assert admin.post("/admin/index", json={"name": "twice"}).status_code == 201
    again = admin.post("/admin/index", json={"name": "twice"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "index_exists"
    empty = admin.post("/admin/index/twice/documents", json={"documents": [{"id": "a", "text": "  "}]})
    assert empty.status_code == 400 and "'a' has no text" in empty.json()["error"]["message"]
    assert admin.post("/admin/index/twice/query", json={"query": "x", "k": 0}).status_code == 400
    missing = admin.post("/admin/index/nowhere/query", json={"query": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "index_not_found"
    chat = {
        "model": gateway.gateway.core.model_name,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}],
        "index": "nowhere",
    }
    reply = httpx.post(gateway.url + "/v1/chat/completions", json=chat, timeout=60)
    assert reply.status_code == 404 and reply.json()["error"]["param"] == "index"
    assert admin.delete("/admin/index/twice").json()["deleted"] is True
    assert admin.get("/admin/index/twice").status_code == 404


def test_through_an_api_server_a_chat_is_answered_by_the_core(home, long_model, gateway, admin, tmp_path) -> None:
    """API server processes hold no index: a chat that names one is passed on whole to the gateway's core (which
    loaded the indexes saved in this home at start), sources and all; a stream that names one is a clear 400."""
    made = admin.post("/admin/index", json={"name": "policy"})
    assert made.status_code == 201
    text = (CORPUS / "travel-policy.md").read_text()
    assert admin.post("/admin/index/policy/documents", json={"documents": [{"id": "travel", "text": text}]}).is_success
    config = tiny_config(tmp_path, embedding_model="all-minilm-l6-v2")
    with running_gateway(GRAPHS / "colocated.yaml", config, long_model, api_servers=1) as fronted:
        chat = {
            "model": fronted.gateway.core.model_name,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "How much can I spend on food per day?"}],
            "index": "policy",
        }
        reply = httpx.post(fronted.url + "/v1/chat/completions", json=chat, timeout=120)
        assert reply.status_code == 200 and reply.json()["sources"][0]["document_id"] == "travel", reply.text
        streamed = httpx.post(fronted.url + "/v1/chat/completions", json=chat | {"stream": True}, timeout=120)
        assert streamed.status_code == 400 and "stream=false" in streamed.json()["error"]["message"]
