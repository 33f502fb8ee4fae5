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


def stream(url: str, index: int, texts: dict[int, str], ends: dict[int, list[str]], ids: dict[int, str]) -> None:
    body = {"prompt": f"burst {index}", "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
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


def test_a_burst_adds_a_replica_that_serves_and_the_quiet_after_it_drains_it(tmp_path):
    model = make_tiny_llama(tmp_path / "llama", max_position_embeddings=2048)
    config = tiny_config(tmp_path)
    with running_gateway(GRAPHS / "colocated.yaml", config, model, attrs={"autoscale": AUTOSCALE},
                         **{"engine.max_num_seqs": 2}) as gw:  # fmt: skip
        scaler = gw.gateway.autoscaler
        assert scaler is not None and scaler.template.engine["max_num_seqs"] == 2
        texts: dict[int, str] = {}
        ends: dict[int, list[str]] = {}
        ids: dict[int, str] = {}
        threads = [threading.Thread(target=stream, args=(gw.url, i, texts, ends, ids)) for i in range(BURST)]
        for thread in threads:
            thread.start()
        wait_for(lambda: scaler.decisions["up"] == 1, "a replica added")
        (replica,) = scaler.replicas
        wait_for(lambda: gw.gateway.engines.engines[replica].state == "ready", "the replica ready")
        wave = [threading.Thread(target=stream, args=(gw.url, i, texts, ends, ids)) for i in range(BURST, BURST + WAVE)]
        for thread in wave:
            thread.start()
        for thread in threads + wave:
            thread.join(REPLY_TIMEOUT_S)
        assert not any(thread.is_alive() for thread in threads + wave), "a stream hung"
        streams = range(BURST + WAVE)
        assert ends == {i: ["length"] for i in streams}  # every stream ended, once
        served_by = {httpx.get(f"{gw.url}/v1/requests/{ids[i]}").json()["instance"] for i in streams}
        assert served_by == {"engine", replica}
        prompts = [f"burst {i}" for i in streams]
        offline = LLM(str(model)).generate(prompts, SamplingParams(max_tokens=EXACT, temperature=0, ignore_eos=True))
        assert [texts[i][: len(o.outputs[0].text)] for i, o in zip(streams, offline)] == [
            o.outputs[0].text for o in offline
        ]

        wait_for(lambda: scaler.decisions["down"] == 1 and not scaler.replicas, "the replica drained")
        wait_for(lambda: replica not in gw.core.registry.instances(), "the replica gone from the instances")
        metrics = httpx.get(gw.url + "/metrics").text
        found = dict(re.findall(r'^sagellm:autoscaler_decisions_total\{direction="(\w+)"\} (\S+)$', metrics, re.M))
        assert found == {"up": "1.0", "down": "1.0"}
