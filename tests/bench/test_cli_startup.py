"""The CLI start-up benchmark asks every command for its help, and the commands it times do answer."""

from __future__ import annotations

import sys

from sagellm.benchmarks.cli_startup import commands, measure
from sagellm.cli.main import COMMANDS  # the test may look from above: the benchmark itself asks `sagellm --help`


def test_every_command_s_help_is_timed_beside_the_interpreter_s_floor() -> None:
    labels = [label for label, _ in commands()]
    assert labels[0].startswith("python") and labels[1] == "sagellm --help"
    assert len(labels) == 2 + len(COMMANDS) and "sagellm serve --help" in labels and "sagellm chat --help" in labels


def test_each_run_is_a_fresh_process_timed_per_repeat() -> None:
    times = measure([("floor", [sys.executable, "-c", "pass"])], repeats=2)
    assert len(times["floor"]) == 2 and all(0 < t < 10 for t in times["floor"])
