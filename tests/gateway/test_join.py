"""A server joining a running gateway as one more instance of its model (`sagellm serve --join`), a real
`sagellm serve` subprocess beside a gateway on the same tiny weights: it registers itself, route sends it a share of
the head's own model's requests with the same greedy text, its streams carry token ids (what an exact resume needs),
and SIGTERM makes it leave (drained) before it stops; a server of models on demand joins as the server of each, and
loads one when the head sends it a request of it. The membership itself, against a real gateway: an admin's
removal is final, a restarted head (another boot id) is joined again, and a refusal (a wrong key, a URL outside the
head's `--allowed-upstream`) is said, not retried."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import trio

from sagellm.gateway.config import GatewayConfig, JoinSettings
from sagellm.gateway.control.join import JoinRefused, Membership
from tests.gateway.conftest import (
    GRAPHS,
    LOCAL_UPSTREAMS,
    REPLY_TIMEOUT_S,
    free_port,
    running_gateway,
    tiny_config,
)
from tests.gateway.test_management import ENGINES

BODY = {"prompt": "The river flows", "max_tokens": 12, "temperature": 0, "ignore_eos": True}


def completed(url: str) -> float:
    """Requests the server's metrics sink counted as finished."""
    text = httpx.get(url + "/metrics").text
    return sum(float(v) for v in re.findall(r"^sagellm:request_success_total\{[^}]*\} (\S+)$", text, re.MULTILINE))


def head_config(tmp_path: Path) -> GatewayConfig:
    """A head that lets servers on this host join (`--allowed-upstream 127.0.0.1`)."""
    return tiny_config(tmp_path / "head", allowed_upstreams=LOCAL_UPSTREAMS)


def joined_engine(admin: httpx.Client, url: str, joiner: subprocess.Popen, timeout: float = 180) -> dict | None:
    """The head's record of the server at `url` once it is ready (None if it never is, or the joiner exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and joiner.poll() is None:
        mine = [e for e in admin.get(ENGINES).json()["data"] if e.get("url") == url]
        if mine and mine[0]["state"] == "ready":
            return mine[0]
        time.sleep(0.2)
    return None


def start_joiner(head, tmp_path: Path, *serving: str) -> tuple[subprocess.Popen, str]:
    """`sagellm serve SERVING... --join HEAD` in a subprocess, logging to tmp_path/joiner.log; it and its URL."""
    port = free_port()
    command = [sys.executable, "-m", "sagellm.cli.main", "serve", *serving, "--port", str(port), "--no-embedding",
               "--state-dir", str(tmp_path / "joiner"), "--join", head.url,
               "--join-key", head.gateway.admin_key]  # fmt: skip
    log = (tmp_path / "joiner.log").open("wb")
    env = {**os.environ, "SAGELLM_LOG_LEVEL": "info"}
    with log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), f"http://127.0.0.1:{port}"


def stop(joiner: subprocess.Popen) -> None:
    if joiner.poll() is None:
        joiner.kill()
        joiner.wait(10)


@pytest.mark.slow
def test_a_joined_server_shares_the_heads_model_with_token_ids_and_leaves_drained(tiny_model, tmp_path):
    with running_gateway(GRAPHS / "colocated.yaml", head_config(tmp_path), tiny_model) as head:
        admin = httpx.Client(base_url=head.url, headers={"authorization": f"Bearer {head.gateway.admin_key}"})
        asked = {**BODY, "return_token_ids": True}
        reference = httpx.post(head.url + "/v1/completions", json=asked, timeout=REPLY_TIMEOUT_S).json()["choices"][0]
        assert len(reference["token_ids"]) == BODY["max_tokens"]
        joiner, url = start_joiner(head, tmp_path, str(GRAPHS / "colocated.yaml"), "--model", str(tiny_model))
        try:
            engine = joined_engine(admin, url, joiner)
            assert engine is not None, (tmp_path / "joiner.log").read_text()[-3000:]
            models = httpx.get(head.url + "/v1/models").json()["data"]
            assert [m["id"] for m in models] == [str(tiny_model)]  # one more instance of the head's model, no new name

            # Route gives the joined server a share; the token ids it streams back (what a resume needs) reach the
            # client as the head's own engine's do.
            with ThreadPoolExecutor(6) as pool:
                replies = list(pool.map(lambda _: _complete(head.url, asked), range(12)))
            assert all(r["choices"][0] == {**reference, "index": 0} for r in replies), replies
            assert completed(url) > 0

            joiner.send_signal(signal.SIGTERM)
            assert joiner.wait(60) == 0
            assert all(e.get("url") != url for e in admin.get(ENGINES).json()["data"])  # it left before it stopped
            after = httpx.post(head.url + "/v1/completions", json=BODY, timeout=REPLY_TIMEOUT_S)
            assert after.status_code == 200 and after.json()["choices"][0]["text"] == reference["text"]
            assert "left" in (tmp_path / "joiner.log").read_text()
        finally:
            stop(joiner)


def _complete(url: str, body: dict) -> dict:
    return httpx.post(url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S).json()


@pytest.mark.slow
def test_a_server_of_models_on_demand_joins_as_each_and_loads_one_when_the_head_asks_for_it(tiny_model, tmp_path):
    with running_gateway(GRAPHS / "colocated.yaml", head_config(tmp_path), tiny_model) as head:
        admin = httpx.Client(base_url=head.url, headers={"authorization": f"Bearer {head.gateway.admin_key}"})
        reference = httpx.post(head.url + "/v1/completions", json=BODY, timeout=REPLY_TIMEOUT_S).json()
        serving = ["--model", f"tiny={tiny_model}", "--model", f"again={tiny_model}", "--max-loaded-models", "1",
                   "--max-num-seqs", "2", "--kv-cache-memory-gb", "0.05"]  # fmt: skip
        joiner, url = start_joiner(head, tmp_path, *serving)
        try:
            assert joined_engine(admin, url, joiner) is not None, (tmp_path / "joiner.log").read_text()[-3000:]
            deadline = time.monotonic() + 60
            while len([e for e in admin.get(ENGINES).json()["data"] if e.get("url") == url]) < 2:
                assert time.monotonic() < deadline, admin.get(ENGINES).json()
                time.sleep(0.2)
            models = [m["id"] for m in httpx.get(head.url + "/v1/models").json()["data"]]
            assert models == [str(tiny_model), "tiny", "again"]  # the head's own, and the joined server's two
            for name in ("tiny", "again"):  # each loaded on the joined server by the head's request
                reply = httpx.post(head.url + "/v1/completions", json={**BODY, "model": name}, timeout=REPLY_TIMEOUT_S)
                assert reply.status_code == 200, reply.text
                assert reply.json()["choices"][0]["text"] == reference["choices"][0]["text"]
            joiner.send_signal(signal.SIGTERM)
            assert joiner.wait(60) == 0
            assert all(e.get("url") != url for e in admin.get(ENGINES).json()["data"])  # both left before it stopped
        finally:
            stop(joiner)


@pytest.mark.slow
def test_a_keys_limits_hold_for_the_requests_the_head_sends_to_a_joined_server(tiny_model, tmp_path):
    """The head's door counts a key's requests and tokens whichever instance serves them: of twelve requests at
    once under a limit of eight a minute, eight run (a share of them on the joined server), four get a 429, and the
    completions the joined server streamed back count against the key's tokens."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {name: team, key: sk-team-key, requests_per_minute: 8}\n")
    config = tiny_config(tmp_path / "head", allowed_upstreams=LOCAL_UPSTREAMS, api_keys_file=keys)
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as head:
        admin = httpx.Client(base_url=head.url, headers={"authorization": f"Bearer {head.gateway.admin_key}"})
        joiner, url = start_joiner(head, tmp_path, str(GRAPHS / "colocated.yaml"), "--model", str(tiny_model))
        try:
            assert joined_engine(admin, url, joiner) is not None, (tmp_path / "joiner.log").read_text()[-3000:]
            team = {"authorization": "Bearer sk-team-key"}
            with ThreadPoolExecutor(6) as pool:
                replies = list(pool.map(lambda _: httpx.post(head.url + "/v1/completions", json=BODY, headers=team,
                                                             timeout=REPLY_TIMEOUT_S), range(12)))  # fmt: skip
            assert sorted(r.status_code for r in replies) == [200] * 8 + [429] * 4, [r.text for r in replies]
            assert completed(url) > 0  # the joined server ran some of the eight
            used = admin.get("/v1/management/usage").json()["keys"]["team"]
            served = [r.json()["usage"] for r in replies if r.status_code == 200]
            assert used["requests"] == 8 and used["rate_limited"] == {"requests": 4}
            assert used["completion_tokens"] == sum(u["completion_tokens"] for u in served) == 8 * BODY["max_tokens"]
            assert used["last_minute"]["tokens"] == sum(u["total_tokens"] for u in served)
        finally:
            stop(joiner)


def test_an_admins_removal_is_final_and_a_restarted_head_is_joined_again(gateway, admin):
    settings = JoinSettings(
        gateway=gateway.url, model="elsewhere", url="http://127.0.0.1:9/v1", admin_key=gateway.gateway.admin_key,
        recheck_s=0.1,
    )  # fmt: skip

    async def removed_by_admin() -> str:
        membership = Membership(settings)
        async with trio.open_nursery() as nursery:
            await nursery.start(membership.run, "unused")
            first = membership.engine_id
            assert admin.get(f"{ENGINES}/{first}").status_code == 200
            gateway.core.boot_id = "a-restarted-head"  # as if the head restarted (one attribute: no race to fear)
            assert admin.delete(f"{ENGINES}/{first}?force=true").status_code == 200
            with trio.fail_after(10):
                while membership.engine_id == first:
                    await trio.sleep(0.05)
            second = membership.engine_id
            assert admin.get(f"{ENGINES}/{second}").status_code == 200  # joined the "restarted" head again
            assert admin.delete(f"{ENGINES}/{second}?force=true").status_code == 200  # same head: a removal
        return second  # run() returned by itself: it stopped asking

    second = trio.run(removed_by_admin)
    time.sleep(0.3)
    assert all(e["id"] != second and e["model"] != "elsewhere" for e in admin.get(ENGINES).json()["data"])


@pytest.mark.parametrize(
    ("url", "key", "words"),
    [
        ("http://127.0.0.1:9", "not-the-key", "invalid admin key"),
        ("http://10.9.9.9:9", None, "is not an upstream this gateway allows (allowed: 127.0.0.1)"),  # not listed
    ],
)
def test_a_join_the_head_refuses_is_said_not_retried(gateway, url, key, words):
    key = key or gateway.gateway.admin_key
    refused = JoinSettings(gateway=gateway.url, model="elsewhere", url=url, admin_key=key)

    async def join() -> None:
        await Membership(refused).run("unused")

    with pytest.raises(JoinRefused, match="refused to add this server") as raised:
        trio.run(join)
    assert words in str(raised.value)
