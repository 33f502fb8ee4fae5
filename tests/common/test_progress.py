"""Start-up progress: nested stages of this process, other processes' stages from their heartbeats, and the CLI's
line display (a line per change, never per second)."""

from __future__ import annotations

import io
import sys

import pytest

from sagellm.cli.progress_display import showing_progress
from sagellm.common import progress


def test_nested_stages_read_outermost_first_and_end_with_their_blocks() -> None:
    assert progress.current() is None
    with progress.stage("loading model.gguf"):
        with progress.stage("reading weights"):
            what, seconds = progress.current()
            assert what == "loading model.gguf · reading weights" and 0 <= seconds < 5
        assert progress.current()[0] == "loading model.gguf"
    assert progress.current() is None


def test_other_processes_are_reported_under_their_names_while_someone_listens() -> None:
    changes = []
    with progress.listening(lambda: None):  # (what an earlier test's workers left in this process goes)
        pass
    with progress.listening(lambda: changes.append(progress.snapshot())):
        progress.report("decode", "loading model.gguf", elapsed_s=2.0)
        progress.report("decode", "loading model.gguf", elapsed_s=3.0)  # no news: no change
        with progress.stage("reading the tokenizer"):
            pass
        progress.report("decode", None)
    assert [sorted(c) for c in changes] == [["decode"], ["decode", "main"], ["decode"], []]
    assert changes[0]["decode"][0] == "loading model.gguf" and changes[0]["decode"][1] >= 2.0
    assert progress.snapshot() == {}  # what workers said ends with the listening


def test_without_a_terminal_each_change_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with showing_progress("sagellm run"):
        progress.report("prefill", "loading m.gguf", 1.0)
        progress.report("prefill", "loading m.gguf", 2.0)
        with progress.stage("reading m.gguf's config and tokenizer"):
            pass
        progress.report("prefill", "preparing the weights for the cpu backend", 0.1)
    assert err.getvalue().splitlines() == [
        "sagellm run: prefill: loading m.gguf",
        "sagellm run: main: reading m.gguf's config and tokenizer",
        "sagellm run: prefill: preparing the weights for the cpu backend",
    ]
