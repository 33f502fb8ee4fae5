"""`sagellm bench batch`'s own parts: its batch file is one the Batch API takes, and its table reads its rounds."""

from __future__ import annotations

import argparse
import random

from sagellm.benchmarks.batch_live import add_arguments, batch_file, markdown, median
from sagellm.gateway.batches.runner import _parsed


def test_the_batch_file_is_one_the_batch_api_takes():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--lines", "5", "--line-words", "7"])
    data = batch_file(args, "m", random.Random(0))
    lines, errors = _parsed(data, "/v1/chat/completions")
    assert errors == []
    assert [line["custom_id"] for line in lines] == [f"line-{i}" for i in range(5)]
    assert len(lines[0]["body"]["messages"][0]["content"].split()) == 1 + 7


def test_the_table_has_both_runs_of_each_round_and_their_ratios():
    run = {"p50_ttft_ms": 600.0, "p99_ttft_ms": 1500.0, "p50_tpot_ms": 25.0, "p99_tpot_ms": 30.0,
           "output_throughput": 120.0}  # fmt: skip
    restart = {"done_at_stop": 50, "status": "completed", "completed": 500, "failed": 0, "every_line_once": True,
               "batch_s": 230}  # fmt: skip
    rounds = [{"round": 0, "alone": run, "beside": {**run, "p99_ttft_ms": 1650.0}, "lines_done_during_live": 51,
               "restart": restart, "ttft_p99_ratio": 1.1, "tpot_p50_ratio": 1.0}]  # fmt: skip
    table = markdown(rounds)
    assert "| 0 | beside | 600 / 1650 | 25.0 / 30.0 | 120.0 | 51 |" in table
    assert "| 0 | 1.10x | 1.00x | 50 | completed (500 ok, 0 failed) | True | 230 |" in table
    assert median([1.0, None, 3.0]) == 2.0
    assert median([None]) is None
