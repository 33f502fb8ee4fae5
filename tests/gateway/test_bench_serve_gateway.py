"""`sagellm bench serve` against the real sageLLM gateway (tiny model): every request completes, the token counts
are the gateway's `usage`, and the JSON result holds the W1-shaped summary."""

from __future__ import annotations

import json

import pytest

from sagellm.cli.main import main
from sagellm.gateway.serving.core import metrics_snapshot
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config

pytestmark = pytest.mark.slow  # a gateway of its own and a benchmark command


def test_bench_serve_measures_the_gateway(tiny_model, tmp_path):
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path), model=tiny_model) as gw:
        out = tmp_path / "serve.json"
        code = main([
            "bench", "serve", "--target", f"sagellm={gw.url}", "--tokenizer", str(tiny_model), "--num-prompts", "6",
            "--max-concurrency", "3", "--random-input-len", "16", "--random-output-len", "8", "--ignore-eos",
            "--no-progress", "--save-result", "--result-filename", str(out),
        ])  # fmt: skip
        assert code == 0
        snapshot = gw.call(metrics_snapshot, gw.core)
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["summary"]["completed"] == 6 and run["summary"]["failed"] == 0
    assert all(r["ok"] and r["output_tokens"] == r["usage"]["completion_tokens"] == 8 for r in run["requests"])
    assert snapshot.completed >= 6  # + the unmeasured warm-up request
    assert out.with_suffix(".png").exists()
