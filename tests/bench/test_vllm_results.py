"""The table and chart made from `vllm bench serve` result files: grouped by server and concurrency, medians over
seeds, request counts summed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sagellm.benchmarks.vllm_results import load, markdown, summarize
from sagellm.cli.main import main


def write(directory: Path, name: str, throughput: float, ttft: float, completed: int = 64, failed: int = 0) -> None:
    result = {"output_throughput": throughput, "p50_ttft_ms": ttft, "p99_ttft_ms": 2 * ttft, "p50_tpot_ms": 50.0,
              "p99_tpot_ms": 60.0, "completed": completed, "failed": failed, "date": "ignored"}  # fmt: skip
    (directory / name).write_text(json.dumps(result))


def test_medians_per_server_and_concurrency_with_counts_summed(tmp_path: Path) -> None:
    for seed, (tput, ttft) in enumerate([(150.0, 1000.0), (160.0, 1200.0), (140.0, 900.0)]):
        write(tmp_path, f"sagellm_c16_s{seed}.json", tput, ttft)
    write(tmp_path, "peer_c16_s0.json", 100.0, 2000.0, completed=60, failed=4)
    write(tmp_path, "sagellm_c1_s7.json", 40.0, 300.0, completed=8)
    (tmp_path / "notes.json").write_text("{}")  # not a result file: left out
    groups = load(tmp_path)
    assert sorted(groups) == [("peer", 16), ("sagellm", 1), ("sagellm", 16)]
    medians = {key: summarize(results) for key, results in groups.items()}
    assert medians["sagellm", 16]["output_throughput"] == 150.0 and medians["sagellm", 16]["p50_ttft_ms"] == 1000.0
    assert medians["sagellm", 16]["completed"] == 192 and medians["peer", 16]["failed"] == 4
    table = markdown(medians, {key: len(results) for key, results in groups.items()}).splitlines()
    assert table[2] == "| 16 | peer | 1 | 60/4 | 100.0 | 2000 | 4000 | 50.0 | 60.0 |"
    assert table[3].startswith("| 16 | sagellm | 3 | 192/0 | 150.0 |") and table[4].startswith("| 1 | sagellm |")


def test_command_prints_the_table_and_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write(tmp_path, "a_c16_s1.json", 120.0, 800.0)
    assert main(["bench", "vllm-results", str(tmp_path), "--out", str(tmp_path / "out" / "w1")]) == 0
    out = capsys.readouterr().out
    assert "| 16 | a | 1 | 64/0 | 120.0 |" in out and "CPU: " in out
    summary = json.loads((tmp_path / "out" / "w1.json").read_text())
    assert summary["rows"][0]["server"] == "a" and (tmp_path / "out" / "w1.png").stat().st_size > 0
    assert main(["bench", "vllm-results", str(tmp_path / "out")]) == 2  # no result files there: one-line error
