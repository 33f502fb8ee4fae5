"""Smoke test of the W5 pipeline-overhead benchmark at a tiny size: the instant_engine fixture streams what it
promises, every path (direct loop, pipeline, pipeline over two engines) finishes every request with all its tokens,
and the command writes its JSON and PNG. Nothing here is timed; real numbers come from the command itself."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from sagellm.benchmarks.instant_engine import InstantEngine
from sagellm.benchmarks.pipeline_overhead import (
    PATHS,
    BenchmarkError,
    OverheadConfig,
    add_arguments,
    check_complete,
    run,
)
from sagellm.runtime.pipeline.messages import Request


def test_instant_engine_streams_its_tokens_then_ends_with_metrics() -> None:
    engine = InstantEngine(tokens=3, max_running=2)
    for i in range(2):
        assert engine.add(Request(request_id=f"r{i}", prompt_token_ids=[1, 2], arrival_time=0.0)) == []
    assert engine.capacity() == 0 and engine.stats.running == 2 and engine.stats.queued_decode_tokens == 6

    steps = []
    while engine.has_work():
        steps.append(engine.step())

    assert [[d.token_ids for d in step] for step in steps] == [[[0], [0]], [[1], [1]], [[2], [2]]]
    assert [d.finish_reason for d in steps[-1]] == ["length", "length"]
    assert all(d.finish_reason is None and d.metrics is None for d in steps[0] + steps[1])
    metrics = steps[-1][0].metrics
    assert metrics.num_output_tokens == 3 and metrics.num_prompt_tokens == 2
    assert metrics.ttft_s > 0 and metrics.e2e_s >= metrics.ttft_s and metrics.tpot_s >= 0
    assert engine.capacity() == 2 and engine.stats.running == 0 and engine.stats.queued_decode_tokens == 0


def test_check_fails_a_path_that_lost_tokens() -> None:
    config = OverheadConfig(requests=2, tokens=4)
    with pytest.raises(BenchmarkError, match="1 without 4 tokens"):
        check_complete(config, "pipeline", {"a": 4, "b": 3}, [])


def test_every_path_finishes_every_request_and_the_report_has_its_fields(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--requests", "200", "--concurrency", "8", "--tokens", "5", "--out", str(tmp_path)])
    args.no_progress = True

    assert run(args) == 0

    report = json.loads((tmp_path / "pipeline_overhead.json").read_text())
    assert report["config"]["requests"] == 200 and report["config"]["concurrency"] == 8
    assert report["machine"]["cores"] >= 1
    rows = {row["path"]: row for row in report["results"]}
    assert list(rows) == list(PATHS)
    for row in rows.values():
        assert row["completed"] == 200 and row["output_tokens"] == 200 * 5
        assert 0 < row["e2e_p50_ms"] <= row["e2e_p99_ms"]
        assert row["req_s"] > 0 and row["cpu_ms_per_req"] > 0 and 0 < row["mean_in_flight"] <= 8 + 1e-6
        assert row["added_p50_ms"] is not None and row["added_p99_ms"] is not None
    assert rows["direct"]["added_p50_ms"] == 0
    assert (tmp_path / "pipeline_overhead.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
