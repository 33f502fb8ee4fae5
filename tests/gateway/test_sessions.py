"""Sessions: a conversation kept by the gateway, answered over its whole history, and still there after a restart."""

from __future__ import annotations

import httpx
import pytest

from sagellm import LLM, SamplingParams
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config

pytestmark = pytest.mark.slow  # two gateway lifecycles


def test_session_chat_keeps_history_and_survives_a_restart(tiny_model, tmp_path):
    config = tiny_config(tmp_path)
    params = {"temperature": 0, "max_tokens": 6}
    with running_gateway(GRAPHS / "colocated.yaml", config, model=tiny_model) as gw:
        created = httpx.post(gw.url + "/sessions", json={"title": "trip"})
        assert created.status_code == 201
        sid = created.json()["id"]
        first = httpx.post(
            f"{gw.url}/sessions/{sid}/chat",
            json={"messages": [{"role": "user", "content": "Hi"}], **params},
            timeout=REPLY_TIMEOUT_S,
        )
        assert first.status_code == 200 and first.json()["session_id"] == sid
        second = httpx.post(
            f"{gw.url}/sessions/{sid}/chat",
            json={"messages": [{"role": "user", "content": "And then?"}], **params},
            timeout=REPLY_TIMEOUT_S,
        )
        history = httpx.get(f"{gw.url}/sessions/{sid}").json()["messages"]
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
        assert history[-1]["content"] == second.json()["choices"][0]["message"]["content"]
        doomed = httpx.post(gw.url + "/sessions").json()["id"]
        assert httpx.delete(f"{gw.url}/sessions/{doomed}").json()["deleted"]
        assert httpx.get(f"{gw.url}/sessions/{doomed}").status_code == 404
        assert httpx.post(f"{gw.url}/sessions/{sid}/chat", json={"messages": [], "stream": True}).status_code == 400

    # the reply is the model's answer to the whole history
    expected = LLM(str(tiny_model)).chat(history[:-1], SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].text
    assert history[-1]["content"] == expected

    with running_gateway(GRAPHS / "colocated.yaml", config, model=tiny_model) as gw:
        listed = httpx.get(gw.url + "/sessions").json()["data"]
        assert [(s["id"], s["title"], s["num_messages"]) for s in listed] == [(sid, "trip", 4)]
        assert httpx.get(f"{gw.url}/sessions/{sid}").json()["messages"] == history
        appended = httpx.post(
            f"{gw.url}/sessions/{sid}/messages", json={"messages": [{"role": "user", "content": "x"}]}
        )
        assert appended.json()["num_messages"] == 5
