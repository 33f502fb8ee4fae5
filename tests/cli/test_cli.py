"""The `sagellm` command as a user runs it: real subprocesses of the installed console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_llama

SAGELLM = shutil.which("sagellm", path=str(Path(sys.executable).parent)) or "sagellm"


def run(*args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if home is not None:
        env["SAGELLM_HOME"] = str(home)
    return subprocess.run([SAGELLM, *args], capture_output=True, text=True, timeout=240, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("cli") / "tiny-llama")


def test_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0
    for command in ("generate", "model", "inspect", "backends", "bench"):
        assert command in result.stdout


@pytest.mark.slow
def test_backends_table_says_why_not():
    result = run("backends")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    for name in ("cpu", "cuda", "ascend", "cambricon", "hygon"):
        assert name in out
    assert "torch_npu" in out and "torch_mlu" in out


@pytest.mark.slow
def test_generate_streams_from_a_local_model(tiny):
    result = run(
        "generate", "--model", str(tiny), "--raw", "--prompt", "Hello world", "--max-tokens", "5", "--seed", "0"
    )
    assert result.returncode == 0, result.stderr
    assert "5 output tokens" in result.stderr and "finish: length" in result.stderr


@pytest.mark.slow
def test_generate_with_chat_template(tiny):
    result = run("generate", "--model", str(tiny), "--prompt", "Hi", "--max-tokens", "3")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_inspect_shows_the_graph_before_and_after_passes(tiny):
    result = run("inspect", str(tiny))
    assert result.returncode == 0, result.stderr
    assert "before passes" in result.stdout and "after passes" in result.stdout
    assert "add_rmsnorm" in result.stdout and "silu_mul" in result.stdout


@pytest.mark.slow
def test_a_wrong_model_path_is_one_line_not_a_traceback(tmp_path):
    result = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "missing" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bad_sampling_parameter_names_the_field(tiny):
    result = run("generate", "--model", str(tiny), "--prompt", "x", "--temperature", "-1")
    assert result.returncode == 2
    assert "temperature" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_model_list_of_an_empty_cache(tmp_path):
    result = run("model", "list", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name" in result.stdout
