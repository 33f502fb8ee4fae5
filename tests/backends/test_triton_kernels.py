"""Runs triton_kernel_checks.py (the triton kernels against the torch ops) in a fresh Python: under triton's CPU
interpreter always, and natively when a CUDA device is present.

A subprocess because triton reads TRITON_INTERPRET when it is first imported (its own tl.sum/tl.max are jit
functions), so the interpreter cannot be switched on in a process where anything already imported triton."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECKS = Path(__file__).with_name("triton_kernel_checks.py")


def run_checks(interpret: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, "-m", "pytest", str(CHECKS), "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(command, cwd=CHECKS.parents[2], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout


@pytest.mark.slow
@pytest.mark.skipif(  # where pyproject.toml installs triton; there, a missing one must fail
    (platform.system(), platform.machine()) != ("Linux", "x86_64"), reason="triton is a dependency on Linux x86_64 only"
)
def test_triton_kernels_under_cpu_interpreter() -> None:
    run_checks(interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernels_on_cuda() -> None:
    run_checks(interpret=False)
