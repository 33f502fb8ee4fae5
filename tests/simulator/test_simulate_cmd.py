"""`sagellm simulate` through the CLI's own entry point: its table, its JSON, its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sagellm.cli.main import main
from sagellm.simulator.step_model import StepModel


@pytest.fixture
def step_model(tmp_path: Path) -> Path:
    path = tmp_path / "step_model.json"
    StepModel(0.01, 1e-4, 1e-3, 1e-6, source={"note": "made for the test"}).save(path)
    return path


def test_simulate_prints_a_table_and_writes_json(
    step_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sim.json"
    code = main(["simulate", "--step-model", str(step_model), "--instances", "4", "--requests", "500",
                 "--trace", "azure-conv", "--load", "0.7", "--sample", "2", "--slo-ttft-ms", "2000",
                 "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "sagellm simulate: 500 requests (azure-conversation) at" in printed and "goodput req/s" in printed
    assert "step model: " in printed and "wall time on" in printed  # what it simulated with, where it ran
    results = json.loads(out.read_text())
    assert results["summary"]["completed"] == 500 and results["load"] == pytest.approx(0.7)
    assert results["config"]["sample"] == 2


def test_simulate_autoscales_with_classes(step_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--step-model", str(step_model), "--requests", "400", "--trace", "bursty", "--rate",
                 "20", "--autoscale", "1:3", "--startup-s", "2", "--policy", "priority", "--classes"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "autoscaled" in printed and "+1 ->" in printed


def test_simulate_prefill_and_decode_workers(
    step_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pd.json"
    code = main(["simulate", "--step-model", str(step_model), "--pd", "1:3", "--requests", "300", "--trace",
                 "azure-code", "--load", "0.5", "--pd-threshold", "1024", "--kv-latency-ms", "2",
                 "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "1 prefill + 3 decode workers" in printed
    assert "pd_split (threshold 1024 tokens): pd " in printed and "KV hand-over 2 ms + 11 µs" in printed
    results = json.loads(out.read_text())
    assert results["summary"]["completed"] == 300
    assert [(t["role"], t["instances"]) for t in results["config"]["tiers"]] == [("prefill", 1), ("decode", 3)]
    decisions = results["config"]["pd"]["decisions"]
    assert decisions["pd"] > 0 and decisions["pd"] + decisions.get("short_prompt", 0) == 300


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pd", "0:2"], "--pd: expected PREFILL:DECODE"),
        (["--pd", "2"], "--pd: expected PREFILL:DECODE"),
        (["--pd", "1:1", "--autoscale", "1:2"], "--pd and --autoscale"),
        (["--pd", "1:1", "--pd-threshold", "-1"], "pd_threshold_tokens must be >= 0"),
        (["--autoscale", "3"], "--autoscale: expected MIN:MAX"),
        (["--routing", "locality"], "does not model"),
        (["--load", "-1"], "--load must be > 0"),
        (["--requests", "0"], "--requests must be >= 1"),
    ],
)
def test_bad_options_say_what_is_wrong(
    step_model: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--step-model", str(step_model), *extra]) == 2
    assert message in capsys.readouterr().err


def test_by_default_the_shipped_step_model_of_smollm2_and_a_missing_one_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # from any directory: the model comes with the package
    assert main(["simulate", "--requests", "10"]) == 0
    assert "step model: shipped (smollm2-135m-instruct" in capsys.readouterr().out
    assert main(["simulate", "--requests", "10", "--step-model", str(tmp_path / "none.json")]) == 2
    assert "`sagellm bench steps` measures our engine's and saves one" in capsys.readouterr().err
