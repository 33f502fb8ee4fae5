"""Smoke test of `sagellm bench kernels`: every part prints, for every instruction-set variant this CPU runs. Nothing
here is timed; real numbers come from the command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sagellm.backends.native.isa import runnable

pytestmark = pytest.mark.slow


def test_the_roofline_every_variant_and_both_attentions_are_measured():
    command = [sys.executable, "-m", "sagellm.cli.main", "bench", "kernels", "--layers", "1", "--rows", "1,16",
               "--repeats", "1"]  # fmt: skip
    ran = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    assert "CPU: " in ran.stdout and "GFLOPS" in ran.stdout and "oneDNN" in ran.stdout
    for variant in runnable():
        assert f"  {variant.name}: " in ran.stdout, variant.name  # decode attention, per variant
        assert f"{variant.name} " in ran.stdout.split("block linears")[1].split("decode attention")[0]
    assert "32 queries over 544 tokens: native" in ran.stdout
