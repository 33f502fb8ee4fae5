"""Smoke tests of the W6 scheduling benchmark: its tiers serve at their rates in the cluster simulator, which at tiny
scale accounts for every request and replays a seed's outcomes exactly; the priority policy protects the high class
that fifo lets down; and the command runs both parts (the real part on a tiny random Llama)
with repeats on fresh traces, reports medians of the repeats' own numbers with counts summed, and writes its JSON and
PNG. Nothing here is timed; the numbers come from `sagellm bench policies` itself."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sagellm.benchmarks.policies import RealConfig, add_arguments, run
from sagellm.benchmarks.policy_sim import SIM_TIERS, SimConfig, policy_run, rates_tier, run_sim, sim_trace
from sagellm.benchmarks.policy_workload import CLASSES, POLICIES, class_sequence
from sagellm.cli.main import main
from sagellm.simulator.cluster import simulate
from sagellm.simulator.cluster_config import ClusterConfig
from sagellm.simulator.traces import from_rows
from tests.tiny_models import make_tiny_llama

TINY_SIM = SimConfig(instances=10, requests=200, progress=False)


def test_class_sequence_has_exact_shares() -> None:
    classes = class_sequence(60, np.random.default_rng(0))
    assert Counter(c.name for c in classes) == {"high": 12, "normal": 18, "low": 30}
    assert [c.name for c in classes[:12]] != ["high"] * 12  # shuffled


def test_a_tier_serves_at_its_rates() -> None:
    """One request alone on a standard instance: its first token after the prompt at 2,000 tokens/s plus one decode
    step (the prefill step's fixed cost), then one token every 1/6 s."""
    tier = rates_tier("standard", 1.0, 2000.0, 6.0, 4, 1.0)
    trace = from_rows([0.0], [400], [13])
    result = simulate(ClusterConfig(instances=1, tiers=(tier,)), trace)
    assert result.ttft_s[0] == pytest.approx(400 / 2000 + 1 / 6)
    assert result.tpot_s[0] == pytest.approx(1 / 6)


@pytest.mark.parametrize("policy", POLICIES)
def test_simulation_accounts_for_every_request(policy: str) -> None:
    w6 = sim_trace(TINY_SIM, TINY_SIM.seed)
    result = simulate(TINY_SIM.cluster(policy, w6.max_queue, TINY_SIM.seed), w6.trace)
    run = policy_run(policy, 0, w6, result)

    counted = Counter(c.name for c, keep in zip(w6.classes, w6.counted) if keep)
    assert 0 < sum(counted.values()) < TINY_SIM.requests  # the warm-up is left out
    assert {name: t.requests for name, t in run.tallies.items()} == counted
    for tally in run.tallies.values():
        assert tally.met + tally.shed <= tally.requests and len(tally.ttft_s) == tally.requests - tally.shed
    assert [t["instances"] for t in result.info["tiers"]] == [2, 5, 3]  # shares 0.2, 0.5, 0.3 of 10
    assert result.info["tiers"][2]["price_per_1k_tokens"] == SIM_TIERS[2].price_per_1k_tokens
    assert run.stats["wall_s"] > 0


def test_priority_protects_the_high_class_that_fifo_lets_down() -> None:
    part = run_sim(TINY_SIM)
    runs = {r.policy: r for r in part.runs}
    assert list(runs) == list(POLICIES)
    assert part.arrival_rps == pytest.approx(2 * part.capacity_rps) and part.max_queue >= 1
    assert runs["priority"].attainment("high") > runs["fifo"].attainment("high")
    assert runs["fifo"].attainment("low") >= runs["priority"].attainment("low")
    assert "adaptive_switches" in runs["adaptive"].stats


def test_simulation_outcomes_are_deterministic_given_the_seed() -> None:
    """Why repeats of the sim need fresh seeds: the same seed gives the same decisions."""

    def outcomes(seed: int) -> list[dict[str, tuple]]:
        part = run_sim(replace(TINY_SIM, seed=seed))
        return [{n: (t.requests, t.met, t.shed, tuple(t.ttft_s)) for n, t in r.tallies.items()} for r in part.runs]

    assert outcomes(0) == outcomes(0)
    assert outcomes(1) != outcomes(0)


def test_sim_repeats_interleave_policies_on_fresh_traces() -> None:
    config = replace(TINY_SIM, seed=3, repeats=2, policies=("fifo", "priority"))
    part = run_sim(config)
    assert [(r.policy, r.repeat) for r in part.runs] == [("fifo", 0), ("priority", 0), ("fifo", 1), ("priority", 1)]
    assert [t["seed"] for t in part.traces] == [3, 4]
    for repeat, seed in enumerate((3, 4)):  # repeat r is exactly the one-repeat run of seed + r
        alone = run_sim(replace(config, seed=seed, repeats=1))
        assert [r.to_json()["classes"] for r in alone.runs] == [
            r.to_json()["classes"] for r in part.runs if r.repeat == repeat
        ]
    assert part.runs[0].to_json()["classes"] != part.runs[2].to_json()["classes"]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.slow
def test_command_runs_both_parts_with_repeats_and_reports_medians(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny-llama")
    out = tmp_path / "policies"
    args = _parse(
        *["--model", str(model), "--requests", "8", "--capacity-requests", "6", "--prompt-len", "16"],
        *["--output-len", "4", "--policies", "fifo,priority", "--sim-instances", "10", "--sim-requests", "200"],
        *["--threads", "1", "--seed", "3", "--repeats", "2", "--out", str(out), "--no-progress"],
    )

    assert run(args) == 0

    results = json.loads(out.with_suffix(".json").read_text())
    assert [c["name"] for c in results["classes"]] == [c.name for c in CLASSES]
    assert results["machine"]["cores"] >= 1 and "--sim-instances 10" in results["command"]
    assert "--repeats 2" in results["command"]
    for name in ("real", "sim"):
        part = results[name]
        assert part["config"]["repeats"] == 2
        assert [t["seed"] for t in part["traces"]] == [3, 4]  # a fresh trace per repeat
        assert part["capacity_rps"] == pytest.approx(np.median([t["capacity_rps"] for t in part["traces"]]))
        assert part["capacity_rps"] > 0 and part["arrival_rps"] == pytest.approx(2 * part["capacity_rps"])
        assert [r["policy"] for r in part["results"]] == ["fifo", "priority"]
        for result in part["results"]:
            runs = result["runs"]
            assert [r["repeat"] for r in runs] == [0, 1] and {r["policy"] for r in runs} == {result["policy"]}
            assert result["overall"] == pytest.approx(np.median([r["overall"] for r in runs]))
            assert 0 <= result["overall"] <= 1
            for cls, medians in result["classes"].items():
                own = [r["classes"][cls] for r in runs]
                for key in ("requests", "met", "shed"):  # counts summed
                    assert medians[key] == sum(o[key] for o in own), (cls, key)
                for key in ("attainment", "ttft_p50_ms", "ttft_p99_ms"):
                    measured = [o[key] for o in own if o[key] is not None]
                    expected = float(np.median(measured)) if measured else None
                    assert medians[key] == pytest.approx(expected), (cls, key)
            assert result["stats"]["wall_s"] == pytest.approx(np.median([r["stats"]["wall_s"] for r in runs]))
    real = results["real"]
    assert len({t["capacity_rps"] for t in real["traces"]}) == 1  # measured once, before every repeat
    for result in real["results"]:
        assert [sum(c["requests"] for c in r["classes"].values()) for r in result["runs"]] == [8, 8]
        assert sum(c["requests"] for c in result["classes"].values()) == 16
    sim = results["sim"]
    assert sim["traces"][0]["capacity_rps"] != sim["traces"][1]["capacity_rps"]  # each seed's trace gives its own
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_cli_takes_repeats_and_rejects_fewer_than_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert _parse("--repeats", "3").repeats == 3 and _parse().repeats == 1
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "policies", "--repeats", bad])
        assert exit_info.value.code == 2
        assert "--repeats: must be an integer >= 1" in capsys.readouterr().err
    for config in (RealConfig, SimConfig):
        with pytest.raises(ValueError, match="repeats must be >= 1"):
            config(repeats=0)
