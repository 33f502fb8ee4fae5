"""Who may call what: every route the gateway serves (read from its own OpenAPI document, so a new route cannot be
missed) called with no key, a wrong key, a user's API key and the admin key. User routes take an API key and only
that, admin routes the admin key and only that, the few public ones anybody; no combination is a 5xx.

The table below is the policy: a route that is not in it fails the test until someone decides who may call it."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from sagellm.gateway.server import GatewayThread
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow

USER_KEY, ADMIN_KEY, WRONG_KEY = "user-key-0123456789", "admin-key-0123456789", "wrong-key-0123456789"
# Anybody: liveness and readiness probes, Prometheus, the API's description, and a prefill's KV, whose unguessable
# id is the capability a decode server presents (`openai/kv_transfer.py`).
PUBLIC = {"GET /", "GET /health", "GET /ready", "GET /metrics", "GET /openapi.json", "GET /v1/kv_transfer/{secret}"}
# A user's API key: what programs ask of the models.
USER = {
    "GET /v1/models", "GET /v1/models/{model}", "GET /v1/requests/{request_id}", "POST /v1/completions",
    "POST /v1/chat/completions",
    "POST /v1/embeddings", "POST /v1/responses", "POST /v1/messages", "POST /v1/messages/count_tokens",
    "POST /tokenize", "POST /detokenize", "GET /tokenizer_info", "GET /version",
    "POST /sessions", "GET /sessions", "GET /sessions/{session_id}", "DELETE /sessions/{session_id}",
    "POST /sessions/{session_id}/messages", "POST /sessions/{session_id}/chat",
    "GET /api/version", "GET /api/tags", "POST /api/show", "GET /api/ps", "POST /api/chat", "POST /api/generate",
    "POST /api/embed", "POST /api/embeddings", "POST /api/pull", "POST /api/create", "POST /api/copy",
    "DELETE /api/delete", "POST /api/push", "GET /api/blobs/{digest}", "POST /api/blobs/{digest}",
    "POST /rerank", "POST /v1/rerank", "POST /v2/rerank", "POST /score", "POST /v1/score", "POST /classify",
    "POST /pooling",
    "POST /v1/files", "GET /v1/files", "GET /v1/files/{file_id}", "GET /v1/files/{file_id}/content",
    "DELETE /v1/files/{file_id}", "POST /v1/batches", "GET /v1/batches", "GET /v1/batches/{batch_id}",
    "POST /v1/batches/{batch_id}/cancel",
    "GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}", "POST /v1/responses/{response_id}/cancel",
    "GET /v1/responses/{response_id}/input_items",
    "POST /v1/conversations", "GET /v1/conversations/{conversation_id}", "POST /v1/conversations/{conversation_id}",
    "DELETE /v1/conversations/{conversation_id}", "GET /v1/conversations/{conversation_id}/items",
    "POST /v1/conversations/{conversation_id}/items", "GET /v1/conversations/{conversation_id}/items/{item_id}",
    "DELETE /v1/conversations/{conversation_id}/items/{item_id}",
}  # fmt: skip
# The admin key: what changes the server (engines, models, adapters, policies, sleep, indexes) or shows its insides.
ADMIN = {
    "POST /admin/set_policy", "GET /admin/metrics",
    "GET /v1/management/engines", "POST /v1/management/engines", "GET /v1/management/engines/{engine_id}",
    "DELETE /v1/management/engines/{engine_id}", "GET /v1/management/engines/{engine_id}/health",
    "GET /v1/management/health", "GET /v1/management/gpu", "GET /v1/management/backends", "GET /v1/management/usage",
    "POST /models/load", "POST /models/unload", "GET /v1/management/models",
    "POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter",
    "POST /sleep", "POST /wake_up", "GET /is_sleeping",
    "POST /admin/index", "GET /admin/index", "GET /admin/index/{name}", "DELETE /admin/index/{name}",
    "POST /admin/index/{name}/documents", "DELETE /admin/index/{name}/documents/{document_id}",
    "POST /admin/index/{name}/query",
}  # fmt: skip
KEYS = {"none": None, "wrong": WRONG_KEY, "user": USER_KEY, "admin": ADMIN_KEY}
# Routes whose admin call would change the shared server for the calls after it: their admin call is made last.
CHANGES_THE_SERVER = {"POST /sleep"}


@pytest.fixture(scope="module", params=[0, 1], ids=["gateway", "api-server"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    """The gateway answering HTTP itself, then behind an API server process, which checks user keys on its own and
    passes every other route on to the core's."""
    tmp = tmp_path_factory.mktemp("auth")
    model = make_tiny_llama(tmp / "tiny-llama")
    config = tiny_config(tmp, api_keys=[USER_KEY], admin_key=ADMIN_KEY)
    with running_gateway(GRAPHS / "colocated.yaml", config, model=model, api_servers=request.param) as gw:
        yield gw


def _routes(gateway: GatewayThread) -> set[str]:
    document = httpx.get(gateway.url + "/openapi.json").json()
    return {f"{method.upper()} {path}" for path, operations in document["paths"].items() for method in operations}


def _call(gateway: GatewayThread, route: str, key: str | None) -> httpx.Response:
    method, path = route.split(" ", 1)
    path = re.sub(r"\{\w+\}", "no-such-thing", path)
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    body = {"json": {}} if method == "POST" else {}
    return httpx.request(method, gateway.url + path, headers=headers, timeout=REPLY_TIMEOUT_S, **body)


def test_every_route_has_a_declared_policy(gateway: GatewayThread) -> None:
    served = _routes(gateway)
    assert not PUBLIC & USER and not USER & ADMIN and not PUBLIC & ADMIN
    assert served - (PUBLIC | USER | ADMIN) == set(), "routes no policy names: add each to PUBLIC, USER or ADMIN"
    assert (PUBLIC | USER | ADMIN) - served == set(), "the policy names routes the gateway no longer serves"


@pytest.mark.parametrize("who", list(KEYS))
def test_each_route_answers_only_the_keys_it_should(gateway: GatewayThread, who: str) -> None:
    routes = sorted(_routes(gateway), key=lambda r: r in CHANGES_THE_SERVER)
    wrong: list[str] = []
    for route in routes:
        reply = _call(gateway, route, KEYS[who])
        allowed = route in PUBLIC or (route in USER and who == "user") or (route in ADMIN and who == "admin")
        if reply.status_code >= 500:
            wrong.append(f"{route} with {who} key: {reply.status_code} {reply.text[:200]}")
        elif allowed == (reply.status_code == 401):
            wrong.append(f"{route} with {who} key: {reply.status_code} (allowed: {allowed}) {reply.text[:200]}")
        elif reply.status_code == 401:
            assert "error" in reply.json(), route  # OpenAI's shape, or Anthropic's on its routes
    if who == "admin":  # the sleep the matrix asked for, undone
        assert httpx.post(gateway.url + "/wake_up", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    assert wrong == []
