"""sageLLM installed from its wheel, not run from the source tree: the wheel is built, installed into a folder of its
own and imported from there alone (Python started without site, so the editable install of the tests cannot answer),
from a directory that holds no graphs: the shipped graphs come with it, and `sagellm run` finds them by name."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_install_serves_the_shipped_graphs_from_any_directory(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(wheels)], check=True)
    (wheel,) = wheels.glob("sagellm-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    env = {"PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def python(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-S", *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    where = python("-c", "import sagellm.gateway.config as c, sagellm; print(sagellm.__file__); print(c.DEFAULT_GRAPH)")
    package, default = where.split()
    assert package.startswith(str(target)) and default == str(target / "sagellm/graphs/colocated.yaml")
    model = make_tiny_llama(tmp_path / "tiny")
    for graph in ("colocated", "graphs/colocated.yaml"):
        out = python(
            "-m", "sagellm.cli.main", "run", graph, "--model", str(model), "--prompt", "Hi", "--max-tokens", "3"
        )
        assert out.strip(), f"sagellm run {graph} printed nothing"
