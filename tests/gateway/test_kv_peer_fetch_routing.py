"""A KV block fetched from another instance, end to end: two engines, each with a RAM tier and its KV events
published; round-robin routing sends a session's second turn to the engine that has never seen it, route's event
index names the engine that holds its prefix (`request.peer_prefix`), and the engine fetches the blocks from there
(its block server's answer, under the holder's lock, while the holder may be stepping) instead of computing them. The
reply is the one the holder gives for the same prompt."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.network]

ENGINE = {"block_size": 4, "num_kv_blocks": 512, "max_num_seqs": 2, "kv_offload_ram_gb": 0.05}
SESSION = "A session opens with its repository files: " + " ".join(f"f{j}" for j in range(30))


def _complete(url: str, prompt: str, max_tokens: int = 6) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S * 2)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.parametrize("placement", ["task", "process"])
def test_a_returning_session_sent_elsewhere_fetches_its_prefix_from_the_holder(tiny_model, tmp_path, placement):
    """Engines as tasks of the gateway's process, or each in a process of its own (the hint and the block server's
    address then cross the pipeline's sockets)."""
    overrides = {"route.strategy": "round_robin", "route.block_size": ENGINE["block_size"]}
    for engine in ("engine_a", "engine_b"):
        overrides |= {f"{engine}.{name}": value for name, value in ENGINE.items()}
        overrides[f"{engine}.kv_events_config"] = {"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:0",
                                                   "replay_endpoint": "tcp://127.0.0.1:0"}  # fmt: skip
    graph = tmp_path / "graph.yaml"
    graph.write_text((GRAPHS / "multi_instance.yaml").read_text().replace("placement: task", f"placement: {placement}"))
    with running_gateway(graph, tiny_config(tmp_path), tiny_model, **overrides) as gateway:
        route = gateway.core.executor.executor.operators["route"]
        deadline = time.monotonic() + 60
        while not all(route.prefix_index.follows(engine) for engine in ("engine_a", "engine_b")):
            assert time.monotonic() < deadline, "route never caught up with the engines' events"
            for _ in range(2):  # route follows the events of the engines a request finds them published by
                _complete(gateway.url, "A warm-up of nobody's session.")
            time.sleep(0.2)
        first = _complete(gateway.url, SESSION)  # round robin: one engine, the holder
        _complete(gateway.url, "Nobody's either.")  # the other
        time.sleep(1.0)  # the holder's events of the session's blocks (flushed every 0.5 s)
        with ThreadPoolExecutor(1) as pool:  # the holder busy stepping another request while it answers the fetch
            busy = pool.submit(_complete, gateway.url, "Something long to write about.", 48)
            time.sleep(0.3)
            turn = SESSION + " and now the tool's output."
            fetched = _complete(gateway.url, turn)  # round robin: the other engine, told who holds the prefix
            assert busy.result()["usage"]["completion_tokens"] == 48
        by_tier = fetched["usage"]["prompt_tokens_details"]["cached_tokens_by_tier"]
        assert by_tier.get("peer", 0) >= 60, by_tier
        time.sleep(1.0)
        held = _complete(gateway.url, turn)  # back on the holder: the session from its own pages, and the turn's
        by_tier = held["usage"]["prompt_tokens_details"]["cached_tokens_by_tier"]  # blocks from the other engine
        assert by_tier["pages"] >= 60 and by_tier.get("peer", 0) > 0, by_tier
        assert fetched["choices"][0]["text"] == held["choices"][0]["text"]
        stats = gateway.core.executor.executor.instances
        assert stats["engine_a"].kv_blocks_endpoint and stats["engine_b"].kv_blocks_token
        # Only route names a peer: a caller's word on where to fetch KV from is refused, naming the field
        peer = {"instance": "engine_a", "endpoint": "tcp://10.0.0.1:9", "token": "x", "blocks": 9}
        body = {"prompt": turn, "max_tokens": 2, "peer_prefix": peer}
        refused = httpx.post(gateway.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S)
        assert refused.status_code == 400 and "peer_prefix" in refused.text, refused.text
        metrics = httpx.get(gateway.url + "/metrics", timeout=REPLY_TIMEOUT_S).text
        assert stats["engine_a"].kv_blocks_token not in metrics
    assert first["usage"]["prompt_tokens"] > 60
