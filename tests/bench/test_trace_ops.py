"""`sagellm bench trace-ops` on a real torch profiler trace: self times add up to the spans without counting a
child twice, and steps are told apart by the names vLLM's worker gives them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from sagellm.benchmarks.trace_ops import self_times, trace_spans
from sagellm.cli.main import main


def make_trace(path: Path, steps: int) -> Path:
    x, w = torch.randn(64, 256), torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("execute_context_0(0)_generation_4(4)"):
                torch.relu(torch.mm(x, w))
    prof.export_chrome_trace(str(path))
    return path


def test_self_times_count_each_microsecond_once(tmp_path):
    trace = make_trace(tmp_path / "trace.json", 3)
    events = trace_spans(trace)
    times = self_times(events)
    step = "execute_context_0(0)_generation_4(4)"
    assert times["decode", step][1] == 3 and times["decode", "aten::mm"][1] == 3
    steps = [e for e in events if e["name"] == step]
    inside = sum(us for (_, name), (us, _) in times.items() if name != step)
    # The steps' own time plus everything called inside them is the steps' span (on this one thread).
    assert times["decode", step][0] + inside == pytest.approx(sum(e["dur"] for e in steps), rel=1e-6, abs=1.0)


def test_cli_prints_ms_per_step(tmp_path, capsys):
    make_trace(tmp_path / "a.json", 2)
    assert main(["bench", "trace-ops", str(tmp_path), "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "decode steps: 2," in out and "| aten::mm |" in out
