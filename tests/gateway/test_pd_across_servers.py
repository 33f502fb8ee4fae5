"""PD across two `sagellm serve` processes' worth of gateways on 127.0.0.1 (tiny weights), with vLLM's disaggregated-
serving protocol: the prefill call (`kv_transfer_params: {"do_remote_decode": true}`) answers where the KV waits, the
decode call fetches it and goes on; the greedy output is one server's alone (the oracle). Then a third gateway with
both attached as prefill and decode servers does it for its clients, and a decode server lost mid-stream is resumed.
What the protocol refuses, with the reason. Each server is started in its part (`--kv-transfer-role`: the prefill
server a producer, the decode server a consumer of the prefill server's KV, `--kv-transfer-peers`); what any other
caller's params are refused is `tests/security/test_kv_transfer_trust.py`'s."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from tests.gateway.conftest import (
    GRAPHS,
    LOCAL_UPSTREAMS,
    PRODUCER,
    REPLY_TIMEOUT_S,
    decoding_from,
    free_port,
    running_gateway,
    running_upstream,
    tiny_config,
)

PROMPT = "The history of the river begins with the melting of a glacier far upstream. "
GREEDY = {"model": "upstream", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
REMOTE_DECODE = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                 "remote_block_ids": None, "remote_host": None, "remote_port": None}  # fmt: skip


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=REPLY_TIMEOUT_S)


def test_a_prefill_server_and_a_decode_server_give_one_servers_greedy_tokens(upstreams):
    prefill, decode = upstreams
    alone = post(decode.url, "/v1/completions", GREEDY | {"return_token_ids": True}).json()["choices"][0]

    first = post(prefill.url, "/v1/completions", GREEDY | {"max_tokens": 1, "kv_transfer_params": REMOTE_DECODE})
    assert first.status_code == 200, first.text
    params = first.json()["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["remote_port"] == int(prefill.url.rsplit(":", 1)[1])
    assert first.json()["choices"][0]["text"] == alone["text"][: len(first.json()["choices"][0]["text"])]
    fetched_before = prefill.core.kv_outbox.fetched

    second = post(decode.url, "/v1/completions", GREEDY | {"kv_transfer_params": params, "return_token_ids": True})
    assert second.status_code == 200, second.text
    assert second.json()["choices"][0]["token_ids"] == alone["token_ids"]
    assert second.json()["choices"][0]["text"] == alone["text"]
    assert prefill.core.kv_outbox.fetched == fetched_before + 1

    again = post(decode.url, "/v1/completions", GREEDY | {"kv_transfer_params": params})
    assert again.status_code == 503 and "no KV under that id" in again.json()["error"]["message"]  # fetched once


def test_a_chat_splits_too_and_streams_from_the_decode_server(upstreams):
    prefill, decode = upstreams
    chat = {"model": "upstream", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 0}
    alone = post(decode.url, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    first = post(prefill.url, "/v1/chat/completions", chat | {"max_tokens": 1, "kv_transfer_params": REMOTE_DECODE})
    params = first.json()["kv_transfer_params"]
    with httpx.stream(
        "POST", decode.url + "/v1/chat/completions", json=chat | {"stream": True, "kv_transfer_params": params},
        timeout=REPLY_TIMEOUT_S,
    ) as reply:  # fmt: skip
        assert reply.status_code == 200
        events = [line for line in reply.iter_lines() if line.startswith("data: {")]
    text = "".join(
        choice["delta"].get("content") or ""
        for event in events
        for choice in httpx.Response(200, content=event[6:]).json()["choices"]
    )
    assert text == alone


def test_what_the_protocol_refuses(upstreams):
    prefill, decode = upstreams
    streamed = post(prefill.url, "/v1/completions", GREEDY | {"stream": True, "kv_transfer_params": REMOTE_DECODE})
    assert streamed.status_code == 400 and "stream=false" in streamed.json()["error"]["message"]
    several = post(prefill.url, "/v1/completions", GREEDY | {"n": 2, "kv_transfer_params": REMOTE_DECODE})
    assert several.status_code == 400 and "n=1" in several.json()["error"]["message"]
    incomplete = post(decode.url, "/v1/completions", GREEDY | {"kv_transfer_params": {"do_remote_prefill": True}})
    assert incomplete.status_code == 400 and "remote_request_id" in incomplete.json()["error"]["message"]
    assert httpx.get(prefill.url + "/v1/kv_transfer/guessed").status_code == 404

    params = post(prefill.url, "/v1/completions", GREEDY | {"kv_transfer_params": REMOTE_DECODE}).json()
    other_prompt = {"prompt": "Another prompt.", "kv_transfer_params": params["kv_transfer_params"]}
    other = post(decode.url, "/v1/completions", GREEDY | other_prompt)
    assert other.status_code == 400 and "not this request's" in other.json()["error"]["message"]
    plain = post(decode.url, "/v1/completions", GREEDY | {"kv_transfer_params": {"do_remote_decode": False}})
    assert plain.status_code == 200  # vLLM's default params ask for nothing

    halves = {"consumer": (decode, REMOTE_DECODE), "producer": (prefill, params["kv_transfer_params"])}
    for role, (server, asked) in halves.items():  # each server does its own half alone
        other_half = post(server.url, "/v1/completions", GREEDY | {"kv_transfer_params": asked})
        assert other_half.status_code == 400 and f"--kv-transfer-role {role}" in other_half.json()["error"]["message"]


@contextmanager
def front_of(tmp_path, servers: dict[str, tuple]) -> Iterator[tuple]:
    """A gateway with no engine of its own (`control_plane.yaml`), `servers` (name: (server, role)) attached; yields
    it, an admin client and the engine id of each name."""
    threshold = {"pd_split.threshold_tokens": 12}
    config = tiny_config(tmp_path, allowed_upstreams=LOCAL_UPSTREAMS)
    with running_gateway(GRAPHS / "control_plane.yaml", config, **threshold) as front:
        headers = {"authorization": f"Bearer {front.gateway.admin_key}"}
        admin = httpx.Client(base_url=front.url, headers=headers, timeout=REPLY_TIMEOUT_S)
        ids = {}
        for name, (server, role) in servers.items():
            spec = {"model": "upstream", "kind": "openai", "url": server.url, "role": role, "label": name}
            started = admin.post("/v1/management/engines", json=spec)
            assert started.status_code == 201, started.text
            ids[name] = started.json()["id"]
        for engine_id in ids.values():  # each probed once: a prefill server still starting is not split to
            deadline = time.monotonic() + 30
            while admin.get(f"/v1/management/engines/{engine_id}").json()["state"] != "ready":
                assert time.monotonic() < deadline, f"{engine_id} never became ready"
                time.sleep(0.05)
        yield front, admin, ids


def test_a_gateway_runs_pd_over_servers_attached_as_prefill_and_decode(upstreams, tmp_path):
    prefill, decode = upstreams
    alone = post(decode.url, "/v1/completions", GREEDY).json()["choices"][0]["text"]
    with front_of(tmp_path, {"p": (prefill, "prefill"), "d": (decode, "decode")}) as (front, _, _):
        fetched = prefill.core.kv_outbox.fetched
        long = post(front.url, "/v1/completions", GREEDY)
        assert long.status_code == 200, long.text
        assert long.json()["choices"][0]["text"] == alone
        assert prefill.core.kv_outbox.fetched == fetched + 1  # the KV moved from the prefill server to the decode one
        short = post(front.url, "/v1/completions", GREEDY | {"prompt": "Hi."})
        assert short.status_code == 200 and prefill.core.kv_outbox.fetched == fetched + 1  # colocated on decode
        split = front.core.nodes_of("pd_split")["pd_split"].decisions
        assert split["pd"] == 1 and split["short_prompt"] == 1


def test_a_decode_server_lost_mid_stream_is_resumed_through_pd_again(upstreams, tiny_model, tmp_path):
    """The decode server streaming a split request is stopped: the request resumes (its prompt and the text so
    far) through the prefill server and the other decode server, and the client's stream goes on to its end."""
    prefill, decode = upstreams
    with (
        running_upstream(tiny_model, tmp_path / "second", decoding_from(prefill)) as second,
        front_of(tmp_path, {"p": (prefill, "prefill"), "d1": (decode, "decode"), "d2": (second, "decode")}) as (
            front,
            admin,
            ids,
        ),
    ):
        fetched = prefill.core.kv_outbox.fetched
        usage = {"stream_options": {"include_usage": True}}
        body = GREEDY | {"max_tokens": 120, "ignore_eos": True, "stream": True} | usage  # long enough to be cut
        events, stopped = [], None
        with httpx.stream("POST", front.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                if len(events) == 1 and stopped is None:
                    request_id = httpx.Response(200, content=events[0][6:]).json()["id"]
                    stopped = httpx.get(f"{front.url}/v1/requests/{request_id}").json()["instance"]
                    assert (
                        admin.delete(f"/v1/management/engines/{stopped}", params={"force": "true"}).status_code == 200
                    )
        assert stopped in (ids["d1"], ids["d2"]) and not [e for e in events if '"error"' in e]
        assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-3].replace(" ", "")
        resumed = httpx.Response(200, content=events[-2][6:]).json()["usage"]  # the server that finished it
        assert resumed["completion_tokens"] < body["max_tokens"]  # asked for what was left, not the whole again
        assert prefill.core.kv_outbox.fetched == fetched + 2  # prefilled again for the other decode server
        assert httpx.get(f"{front.url}/v1/requests/{request_id}").json()["retries"] == 1


def test_a_prefill_server_gone_before_it_answers_leaves_the_request_whole_on_a_decode_server(
    upstreams, tiny_model, tmp_path
):
    """The only prefill server stops, and before the gateway's health checks see it the split request's prefill
    call fails: its retry (the failed server excluded) runs whole on the decode server: one server's greedy text."""
    _, decode = upstreams
    alone = post(decode.url, "/v1/completions", GREEDY).json()["choices"][0]["text"]
    with ExitStack() as stack:
        doomed = stack.enter_context(running_upstream(tiny_model, tmp_path / "doomed", PRODUCER))
        front, _, _ = stack.enter_context(front_of(tmp_path, {"p": (doomed, "prefill"), "d": (decode, "decode")}))
        doomed.stop()
        reply = post(front.url, "/v1/completions", GREEDY)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == alone
        decisions = front.core.nodes_of("pd_split")["pd_split"].decisions
        # (the health checks may see it first: then it was never sent there)
        assert decisions["prefill_failed"] + decisions["prefill_unhealthy"] == 1
        assert front.core.retries[("unavailable", False)] == decisions["prefill_failed"]


def test_vllms_own_router_runs_pd_over_two_of_ours(upstreams, tmp_path):
    """vllm-router in its vLLM PD mode (the proxy vLLM deployments run) in front of the prefill and the decode
    server: the KV moves between them and the greedy text is one server's."""
    prefill, decode = upstreams
    alone = post(decode.url, "/v1/completions", GREEDY).json()["choices"][0]["text"]
    router = shutil.which("vllm-router") or str(Path(sys.prefix) / "bin" / "vllm-router")
    port = free_port()
    command = [router, "--vllm-pd-disaggregation", "--prefill", prefill.url, "--decode", decode.url,
               "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]  # fmt: skip
    with open(tmp_path / "router.log", "wb") as log, subprocess.Popen(command, stdout=log, stderr=log) as process:
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while not _answers(url + "/health") and time.monotonic() < deadline:
                time.sleep(0.2)
            fetched = prefill.core.kv_outbox.fetched
            reply = post(url, "/v1/completions", GREEDY)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["text"] == alone
            assert prefill.core.kv_outbox.fetched == fetched + 1
        finally:
            process.terminate()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
