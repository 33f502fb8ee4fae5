"""Smoke test of the W4 benchmark (`sagellm bench pd`): on a tiny random Llama, the capacity probe, the colocated
engine and prefill/decode in two worker processes all serve the whole trace of every repeat, long prompts take the PD
path, repeats replay fresh traces with the configurations interleaved, the reported numbers are the medians of the
runs' own (request counts summed), and the run writes its JSON and PNG. Nothing here is timed; real numbers come from
the command itself."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from sagellm.benchmarks import pd_split, pd_split_report
from sagellm.cli.main import main
from tests.tiny_models import make_tiny_llama, make_tokenizer

NUM_REQUESTS, SHORT, LONG, OUTPUT, REPEATS = 6, 8, 40, 4, 2
MEDIANS = ("ttft_p50_ms", "ttft_p99_ms", "ttft_short_p50_ms", "ttft_long_p50_ms", "tpot_p50_ms", "tpot_p99_ms")
MEDIANS += ("slo_attainment", "goodput_req_s", "throughput_req_s", "out_tok_s", "wall_s")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    pd_split_report.add_arguments(parser)
    return parser


@pytest.mark.slow
def test_pd_bench_repeats_serve_every_request_and_report_medians(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny-llama", max_position_embeddings=1024)
    args = _parser().parse_args(
        ["--model", str(model), "--num-requests", str(NUM_REQUESTS), "--capacity-requests", "4"]
        + ["--short-len", str(SHORT), "--long-len", str(LONG), "--long-fraction", "0.5", "--output-len", str(OUTPUT)]
        + ["--threshold-tokens", "32", "--configs", "colocated,pd", "--seed", "5", "--repeats", str(REPEATS)]
        + ["--out", str(tmp_path / "w4"), "--no-progress"]
    )

    assert pd_split_report.run(args) == 0

    results = json.loads((tmp_path / "w4.json").read_text())
    assert results["config"]["repeats"] == REPEATS
    assert results["capacity_req_s"] > 0  # measured once, before every repeat
    assert results["rate_req_s"] == pytest.approx(0.7 * results["capacity_req_s"])
    assert results["machine"]["cores"] >= 1
    rows = {r["config"]: r for r in results["results"]}
    assert set(rows) == {"colocated", "pd"}
    for row in rows.values():
        runs = row["runs"]
        assert [(r["repeat"], r["seed"]) for r in runs] == [(0, 5), (1, 6)]  # a fresh trace per repeat
        assert row["completed"] == REPEATS * NUM_REQUESTS and row["failed"] == 0  # counts summed
        for key in MEDIANS:
            assert row[key] == pytest.approx(float(np.median([r[key] for r in runs]))), key
        for run in runs:
            assert run["completed"] == NUM_REQUESTS and run["failed"] == 0
            assert sorted(r["prompt_tokens"] for r in run["requests"]) == [SHORT] * 3 + [LONG] * 3
            assert all(r["output_tokens"] == OUTPUT and r["error"] is None for r in run["requests"])
            for key in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "throughput_req_s", "wall_s"):
                assert run[key] > 0, key
            assert run["ttft_p99_ms"] >= run["ttft_p50_ms"] and run["tpot_p99_ms"] >= run["tpot_p50_ms"]
            assert 0 <= run["goodput_req_s"] <= run["throughput_req_s"]
    for repeat in range(REPEATS):  # within a repeat every configuration replays the same trace
        shapes = [[r["prompt_tokens"] for r in rows[name]["runs"][repeat]["requests"]] for name in rows]
        assert shapes[0] == shapes[1]
    order = sorted((run["started"], name, run["repeat"]) for name, row in rows.items() for run in row["runs"])
    assert [(name, repeat) for _, name, repeat in order] == [("colocated", 0), ("pd", 0), ("colocated", 1), ("pd", 1)]
    assert [r["pd_split"] for r in rows["pd"]["runs"]] == [{"pd": 3, "short_prompt": 3}] * REPEATS
    assert rows["pd"]["pd_split"] == {"pd": 3 * REPEATS, "short_prompt": 3 * REPEATS}
    assert rows["colocated"]["pd_split"] == {}
    assert (tmp_path / "w4.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_traces_are_identical_for_a_seed_fresh_for_another_and_mix_lengths_exactly() -> None:
    config = pd_split.PDBenchConfig(model="unused", short_len=5, long_len=9, long_fraction=0.2)
    first = pd_split.make_trace(make_tokenizer(), config, 10, rate=2.0, seed=0)
    again = pd_split.make_trace(make_tokenizer(), config, 10, rate=2.0, seed=0)
    other = pd_split.make_trace(make_tokenizer(), config, 10, rate=2.0, seed=1)
    assert first == again
    assert other.prompts != first.prompts and other.offsets_s != first.offsets_s
    for trace in (first, other):
        assert sorted(map(len, trace.prompts)) == [5] * 8 + [9] * 2
        assert trace.offsets_s[0] == 0 and all(b > a for a, b in zip(trace.offsets_s, trace.offsets_s[1:]))
    requests = first.requests(config)
    assert all(r.sampling.ignore_eos and r.sampling.temperature == 0 and r.sampling.max_tokens == 64 for r in requests)
    assert requests[0].ttft_slo_ms == 2000 and requests[0].tpot_slo_ms == 200


def test_cli_takes_repeats_and_rejects_fewer_than_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert _parser().parse_args(["--repeats", "3"]).repeats == 3
    assert _parser().parse_args([]).repeats == 1
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "pd", "--repeats", bad])
        assert exit_info.value.code == 2
        assert "--repeats: must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        pd_split.PDBenchConfig(model="unused", repeats=0)
