"""The autoscaler on a real gateway: a tiny Llama behind graphs/colocated.yaml, its engine running 2 requests at a
time, `autoscale:` from 1 to 2 instances. A burst of greedy streams makes it start a replica (an engine process of the
same model and settings, through the engine manager); once the replica is ready, a second wave is spread over both;
every stream ends once, its text beginning with the offline API's first `EXACT` greedy tokens (a random model's
logits are nearly flat, and over 300 tokens a near-tie meets another batch's fp32 sum order somewhere); after the
load it drains the replica and stops it, and /metrics counts both decisions."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from sagellm import LLM, SamplingParams
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # an engine process started and stopped
BURST, WAVE = 24, 8  # streams
TOKENS = 300
EXACT = 24  # greedy tokens compared with the offline API's
AUTOSCALE = {"min_instances": 1, "max_instances": 2, "up_waiting_per_instance": 1, "up_cooldown_s": 0,
             "down_delay_s": 2, "interval_s": 0.25}  # fmt: skip


def stream(
    url: str, index: int, texts: dict[int, str], ends: dict[int, list[str]], ids: dict[int, str], model: str = ""
) -> None:
    body = {"prompt": f"burst {index}", "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    if model:
        body["model"] = model
    texts[index], ends[index] = "", []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                ends[index].append(event["error"]["code"])
                continue
            ids[index] = event["id"]
            texts[index] += event["choices"][0]["text"]
            if event["choices"][0]["finish_reason"]:
                ends[index].append(event["choices"][0]["finish_reason"])


def wait_for(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not in {timeout_s:.0f} s: {what}"
        time.sleep(0.1)


def burst_and_wave(
    gw: Any, scaler: Callable[[], Any], burst: int, wave: int, model: str = ""
) -> tuple[str, dict[int, str], dict[int, str]]:
    """`burst` streams, until the autoscaler `scaler()` adds a replica; `wave` more once the replica is ready; every
    stream to its end, once. -> the replica, and each stream's text and request id."""
    texts: dict[int, str] = {}
    ends: dict[int, list[str]] = {}
    ids: dict[int, str] = {}
    threads = [threading.Thread(target=stream, args=(gw.url, i, texts, ends, ids, model)) for i in range(burst)]
    for thread in threads:
        thread.start()
    wait_for(lambda: scaler() is not None and scaler().decisions["up"] == 1, "a replica added")
    (replica,) = scaler().replicas
    wait_for(lambda: gw.gateway.engines.engines[replica].state == "ready", "the replica ready")
    more = [threading.Thread(target=stream, args=(gw.url, i, texts, ends, ids, model))
            for i in range(burst, burst + wave)]  # fmt: skip
    for thread in more:
        thread.start()
    for thread in threads + more:
        thread.join(REPLY_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads + more), "a stream hung"
    assert ends == {i: ["length"] for i in range(burst + wave)}  # every stream ended, once
    return replica, texts, ids


def assert_texts_begin_as_offline(model: Path, texts: dict[int, str]) -> None:
    """Each stream's text begins with the offline API's first EXACT greedy tokens of its prompt."""
    prompts = [f"burst {i}" for i in range(len(texts))]
    offline = LLM(str(model)).generate(prompts, SamplingParams(max_tokens=EXACT, temperature=0, ignore_eos=True))
    assert [texts[i][: len(o.outputs[0].text)] for i, o in enumerate(offline)] == [o.outputs[0].text for o in offline]


def test_a_burst_adds_a_replica_that_serves_and_the_quiet_after_it_drains_it(tmp_path):
    model = make_tiny_llama(tmp_path / "llama", max_position_embeddings=2048)
    config = tiny_config(tmp_path)
    with running_gateway(GRAPHS / "colocated.yaml", config, model, attrs={"autoscale": AUTOSCALE},
                         **{"engine.max_num_seqs": 2}) as gw:  # fmt: skip
        scaler = gw.gateway.autoscaler
        assert scaler is not None and scaler.template.engine["max_num_seqs"] == 2
        replica, texts, ids = burst_and_wave(gw, lambda: scaler, BURST, WAVE)
        streams = range(BURST + WAVE)
        served_by = {httpx.get(f"{gw.url}/v1/requests/{ids[i]}").json()["instance"] for i in streams}
        assert served_by == {"engine", replica}
        assert_texts_begin_as_offline(model, texts)

        wait_for(lambda: scaler.decisions["down"] == 1 and not scaler.replicas, "the replica drained")
        wait_for(lambda: replica not in gw.core.registry.instances(), "the replica gone from the instances")
        metrics = httpx.get(gw.url + "/metrics").text
        decided = r'^sagellm:autoscaler_decisions_total\{direction="(\w+)",model="([^"]+)"\} (\S+)$'
        found = {(m, d): n for d, m, n in re.findall(decided, metrics, re.M)}
        assert found == {(gw.core.model_name, "up"): "1.0", (gw.core.model_name, "down"): "1.0"}
