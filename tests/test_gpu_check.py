"""The GPU check (scripts/gpu_check.sh) stays runnable where no GPU is: its bundle is made as for a GPU machine
(scripts/gpu_bundle.sh: our wheel and the wheels the GPU image lacks, their closure checked), then every stage runs
small under `--dry-run` (the triton kernels and the CUDA backend's oracle interpreted, the suite's selection
collected, W1 and the step profile on the cpu backend). A GPU session then finds a script that works and spends its
device time on the GPU's answers, not on the script."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "install", "kernels", "oracle", "suite", "w1", "profile")

pytestmark = [pytest.mark.slow, pytest.mark.network]  # the bundle's wheels come from PyPI


def test_the_bundle_is_made_and_every_stage_of_the_dry_run_passes(tmp_path):
    bundle = subprocess.run(["bash", "scripts/gpu_bundle.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bundle.returncode == 0, bundle.stderr[-3000:]
    assert "neither carried nor on the GPU image" not in bundle.stderr
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SITE": str(tmp_path / "site")}
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert run.returncode == 0, summary + run.stdout[-3000:]
    assert [line.split("|")[1].strip() for line in summary.splitlines() if line.count("|") == 4][2:] == list(STAGES)
    assert summary.count("| pass |") == len(STAGES)
    assert (tmp_path / "out" / "w1.json").is_file() and (tmp_path / "out" / "profile.txt").is_file()
