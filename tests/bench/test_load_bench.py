"""The load benchmark's own logic: medians per stage, its table, the ready time read from `sagellm run`, and its
registration as `sagellm bench load` (the timed runs themselves take a minute: not run here)."""

from __future__ import annotations

import pytest

from sagellm.benchmarks.load import Row, markdown, ready_seconds, summarize
from sagellm.cli.main import main


def test_stages_are_summed_up_in_order_and_unmeasured_ones_left_out() -> None:
    rows = summarize({"weights": [0.7, 0.65432, 0.9], "engine": [], "run_exit": [10.0]})
    assert rows == [Row("weights", 0.7, 0.654, 0.9, [0.7, 0.654, 0.9]), Row("run_exit", 10.0, 10.0, 10.0, [10.0])]
    assert markdown(rows).splitlines()[2:] == [
        "| load_model() | 0.70 | 0.65 | 0.90 |",
        "| sagellm run: spawn to exit | 10.00 | 10.00 | 10.00 |",
    ]


def test_the_ready_line_is_read_from_stderr() -> None:
    assert ready_seconds("sagellm run: starting\nsagellm run: ready in 7.4 s; requests flow\n") == 7.4
    with pytest.raises(RuntimeError, match="no 'ready in X s' line"):
        ready_seconds("Traceback: boom")


def test_registered_as_a_bench_kind(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "load", "--help"])
    assert exited.value.code == 0 and "--repeats" in capsys.readouterr().out
