"""`cache_aware` routing that reads the engines' KV events: two engines, each with a disk tier of its own and its
events published, serve the first turns of six sessions (spread round-robin); the gateway restarts (its memory of
what it sent where is gone; the engines' disks are not) and the sessions come back. With events, every returning
session goes to the engine whose disk holds its prefix (all six served from disk); without, route has only its
estimate, empty after the restart, and half of them land where nothing of theirs is."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.network]

SESSIONS = 6
ENGINE = {"block_size": 4, "num_kv_blocks": 512, "max_num_seqs": 2}


def _session(i: int) -> str:
    return f"Session {i} opens with its own repository files: " + " ".join(f"s{i}w{j}" for j in range(40))


def _complete(url: str, prompt: str) -> dict:
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S * 2)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _gateway(tiny_model, tmp_path, run: str, strategy: str, kv_events: bool):
    overrides = {"route.strategy": strategy, "route.kv_events": kv_events, "route.block_size": ENGINE["block_size"]}
    for engine in ("engine_a", "engine_b"):
        overrides |= {f"{engine}.{name}": value for name, value in ENGINE.items()}
        overrides[f"{engine}.kv_offload_dir"] = str(tmp_path / f"kv_{engine}")  # a disk each: one holder a session
        overrides[f"{engine}.kv_events_config"] = {"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:0",
                                                   "replay_endpoint": "tcp://127.0.0.1:0"}  # fmt: skip
    return running_gateway(GRAPHS / "multi_instance.yaml", tiny_config(tmp_path / run), tiny_model, **overrides)


def _returning_hits(tiny_model, tmp_path, kv_events: bool) -> int:
    """Sessions whose returning turn, after a gateway restart, was served from its prefix on disk."""
    with _gateway(tiny_model, tmp_path, "first", "round_robin", kv_events) as gateway:
        for i in range(SESSIONS):
            _complete(gateway.url, _session(i))
    with _gateway(tiny_model, tmp_path, "again", "cache_aware", kv_events) as gateway:
        _complete(gateway.url, "A warm-up of nobody's session.")  # route starts following the engines' events
        index = gateway.core.executor.executor.operators["route"].prefix_index
        deadline = time.monotonic() + 30
        while kv_events and not all(index.follows(engine) for engine in ("engine_a", "engine_b")):
            assert time.monotonic() < deadline, "route never caught up with the engines' events"
            time.sleep(0.05)
        hits = 0
        for i in range(SESSIONS):
            reply = _complete(gateway.url, _session(i) + " and now the tool's output.")
            cached = reply["usage"]["prompt_tokens_details"]
            hits += cached.get("cached_tokens_by_tier", {}).get("disk", 0) >= 40
    return hits


@pytest.mark.parametrize("kv_events", [True, False])
def test_returning_sessions_go_to_the_engine_that_holds_their_prefix(tiny_model, tmp_path, kv_events):
    hits = _returning_hits(tiny_model, tmp_path, kv_events)
    print(f"returning sessions served from their prefix, kv_events={kv_events}: {hits}/{SESSIONS}")
    if kv_events:
        assert hits == SESSIONS
    else:
        assert hits < SESSIONS  # the estimate, empty after the restart, sends them by load alone
