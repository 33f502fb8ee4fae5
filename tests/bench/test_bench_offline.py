"""Smoke test of `sagellm bench offline`: on a tiny random Llama, both engines run every workload end to end and the
command writes its JSON, PNG and markdown. Nothing here is timed; real numbers come from the command itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sagellm.cli.main import main
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # a benchmark command, both engines on every workload


def test_bench_offline_writes_json_png_and_markdown(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny-llama")
    out, plot, markdown = tmp_path / "offline.json", tmp_path / "offline.png", tmp_path / "offline.md"
    argv = ["bench", "offline", "--model", str(model), "--num-prompts", "3", "--input-len", "12", "--output-len", "4"]
    argv += ["--repeats", "2", "--threads", "1", "--out", str(out), "--plot", str(plot), "--markdown", str(markdown)]

    assert main(argv) == 0

    results = json.loads(out.read_text())
    names = [w["name"] for w in results["workloads"]]
    assert names == ["w1-c16", "w1-c1", "w2-3"]  # W2's 16 and 64 both capped to 3 prompts: one workload
    rows = {(r["workload"], r["engine"]): r for r in results["results"]}
    assert set(rows) == {(w, e) for w in names for e in ("sagellm", "transformers")}
    for row in rows.values():
        assert row["out_tok_s"] > 0 and row["wall_s"] > 0 and row["ttft_p50_ms"] > 0 and row["tpot_p50_ms"] > 0
        assert len(row["runs"]) == 2
    assert set(results["agreement"]) == set(names)
    assert results["machine"]["torch_threads"] == 1 and results["machine"]["cores"] >= 1
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    table = markdown.read_text()
    assert "| w1-c1 | sagellm |" in table and "| w1-c1 | transformers |" in table
