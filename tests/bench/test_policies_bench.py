"""Smoke tests of the W6 scheduling benchmark: the simulator at tiny scale drives the real policy_sort queue and
leaves every instance idle and every request accounted for; the priority policy protects the high class that fifo
lets down; and the command runs both parts (the real part on a tiny random Llama) and writes its JSON and PNG.
Nothing here is timed; the numbers come from `sagellm bench policies` itself."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sagellm.bench.policies import add_arguments, run
from sagellm.bench.policy_sim import SimConfig, Simulation, run_sim, sim_trace
from sagellm.bench.policy_workload import CLASSES, POLICIES, class_sequence
from tests.tiny_models import make_tiny_llama

pytest.importorskip("matplotlib")

TINY_SIM = SimConfig(instances=10, requests=200, progress=False)


def test_class_sequence_has_exact_shares() -> None:
    classes = class_sequence(60, np.random.default_rng(0))
    assert Counter(c.name for c in classes) == {"high": 12, "normal": 18, "low": 30}
    assert [c.name for c in classes[:12]] != ["high"] * 12  # shuffled


@pytest.mark.parametrize("policy", POLICIES)
def test_simulation_accounts_for_every_request_and_frees_every_instance(policy: str) -> None:
    trace, capacity = sim_trace(TINY_SIM)
    sim = Simulation(TINY_SIM, trace, capacity, policy)
    ended = []
    run = sim.simulate(ended.append)

    assert len(ended) == TINY_SIM.requests and not sim.jobs and not len(sim.queue)
    counted = Counter(c.name for c, t in zip(trace.classes, trace.offsets) if t >= trace.warmup_s)
    assert {name: t.requests for name, t in run.tallies.items()} == counted
    for tally in run.tallies.values():
        assert tally.met + tally.shed <= tally.requests and len(tally.ttft_s) == tally.requests - tally.shed
    for instance in sim.instances.values():  # the bookkeeping the policies read returns to idle
        s = instance.stats
        assert (s.running, s.queued_prefill_tokens, s.queued_decode_tokens, instance.busy) == (0, 0, 0, 0)
    assert sim.free == sum(t.max_running * n for t, n in zip(TINY_SIM.tiers, (2, 5, 3)))
    assert sim.load.in_flight == 0 and sim.load.completed + sim.load.failed == TINY_SIM.requests
    assert run.stats["pop_calls"] > 0 and run.stats["pop_us_mean"] > 0 and run.stats["policy_cpu_s"] > 0


def test_priority_protects_the_high_class_that_fifo_lets_down() -> None:
    part = run_sim(TINY_SIM)
    runs = {r.policy: r for r in part.runs}
    assert list(runs) == list(POLICIES)
    assert part.arrival_rps == pytest.approx(2 * part.capacity_rps) and part.max_queue >= 1
    assert runs["priority"].attainment("high") > runs["fifo"].attainment("high")
    assert runs["fifo"].attainment("low") >= runs["priority"].attainment("low")
    assert "adaptive_switches" in runs["adaptive"].stats


def test_command_runs_both_parts_and_writes_json_and_png(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny-llama")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "policies"
    args = parser.parse_args(
        ["--model", str(model), "--requests", "8", "--capacity-requests", "6", "--prompt-len", "16"]
        + ["--output-len", "4", "--policies", "priority", "--sim-instances", "10", "--sim-requests", "200"]
        + ["--threads", "1", "--out", str(out), "--no-progress"]
    )

    assert run(args) == 0

    results = json.loads(out.with_suffix(".json").read_text())
    assert [c["name"] for c in results["classes"]] == [c.name for c in CLASSES]
    assert results["machine"]["cores"] >= 1 and "--sim-instances 10" in results["command"]
    for name in ("real", "sim"):
        part = results[name]
        assert part["capacity_rps"] > 0 and part["arrival_rps"] == pytest.approx(2 * part["capacity_rps"])
        assert [r["policy"] for r in part["results"]] == ["priority"]
        for result in part["results"]:
            assert set(result["classes"]) == {"high", "normal", "low"}
            assert 0 <= result["overall"] <= 1
    real = results["real"]["results"][0]["classes"]
    assert sum(c["requests"] for c in real.values()) == 8
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
