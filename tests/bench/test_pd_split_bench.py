"""Smoke test of the W4 benchmark (`sagellm bench pd`): on a tiny random Llama, the capacity probe, the colocated
engine and prefill/decode in two worker processes all serve the whole trace, long prompts take the PD path, and the
run writes its JSON and PNG. Nothing here is timed; real numbers come from the command itself."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from sagellm.bench import pd_split
from tests.tiny_models import make_tiny_llama, make_tokenizer

pytest.importorskip("matplotlib")

NUM_REQUESTS, SHORT, LONG, OUTPUT = 6, 8, 40, 4


def test_pd_bench_serves_every_request_in_both_configurations(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny-llama", max_position_embeddings=1024)
    parser = argparse.ArgumentParser()
    pd_split.add_arguments(parser)
    args = parser.parse_args(
        ["--model", str(model), "--num-requests", str(NUM_REQUESTS), "--capacity-requests", "4"]
        + ["--short-len", str(SHORT), "--long-len", str(LONG), "--long-fraction", "0.5", "--output-len", str(OUTPUT)]
        + ["--threshold-tokens", "32", "--configs", "colocated,pd", "--out", str(tmp_path / "w4"), "--no-progress"]
    )

    assert pd_split.run(args) == 0

    results = json.loads((tmp_path / "w4.json").read_text())
    assert results["capacity_req_s"] > 0
    assert results["rate_req_s"] == pytest.approx(0.7 * results["capacity_req_s"])
    assert results["machine"]["cores"] >= 1
    rows = {r["config"]: r for r in results["results"]}
    assert set(rows) == {"colocated", "pd"}
    for row in rows.values():
        assert row["finished"] == NUM_REQUESTS and row["failed"] == 0
        requests = row["requests"]
        assert sorted(r["prompt_tokens"] for r in requests) == [SHORT] * 3 + [LONG] * 3  # the same trace for both
        assert all(r["output_tokens"] == OUTPUT and r["error"] is None for r in requests)
        for key in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "throughput_req_s", "wall_s"):
            assert row[key] > 0, key
        assert row["ttft_p99_ms"] >= row["ttft_p50_ms"] and row["tpot_p99_ms"] >= row["tpot_p50_ms"]
        assert 0 <= row["goodput_req_s"] <= row["throughput_req_s"]
    assert rows["pd"]["pd_split"] == {"pd": 3, "short_prompt": 3}
    assert rows["colocated"]["pd_split"] == {}
    assert (tmp_path / "w4.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_traces_are_identical_across_configurations_and_mix_lengths_exactly() -> None:
    config = pd_split.PDBenchConfig(model="unused", short_len=5, long_len=9, long_fraction=0.2)
    first = pd_split.make_trace(make_tokenizer(), config, 10, rate=2.0)
    again = pd_split.make_trace(make_tokenizer(), config, 10, rate=2.0)
    assert first == again
    assert sorted(map(len, first.prompts)) == [5] * 8 + [9] * 2
    assert first.offsets_s[0] == 0 and all(b > a for a, b in zip(first.offsets_s, first.offsets_s[1:]))
    requests = first.requests(config)
    assert all(r.sampling.ignore_eos and r.sampling.temperature == 0 and r.sampling.max_tokens == 64 for r in requests)
    assert requests[0].ttft_slo_ms == 2000 and requests[0].tpot_slo_ms == 200
