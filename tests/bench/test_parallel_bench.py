"""Smoke test of `sagellm bench parallel` on a tiny model: every split runs, gives one process's greedy tokens (or
the command fails), and the table and JSON come out. Nothing here is timed; real numbers come from the command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # the splits' ranks are processes


def test_every_split_runs_exactly_and_the_table_and_json_come_out(tmp_path):
    model = make_tiny_llama(tmp_path / "llama", max_position_embeddings=1024)
    out = tmp_path / "parallel.json"
    command = [sys.executable, "-m", "sagellm.cli.main", "bench", "parallel", "--model", str(model), "--splits",
               "1x1,2x1,1x2", "--repeats", "1", "--out", str(out)]  # fmt: skip
    ran = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    assert "| 2 | 1 |" in ran.stdout and "| 1 | 2 |" in ran.stdout and "CPU: " in ran.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tp"], r["pp"]) for r in rows] == [(1, 1), (2, 1), (1, 2)]
