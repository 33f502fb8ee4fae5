"""sageLLM installed from its wheel, not run from the source tree: the wheel is built, installed into a folder of its
own and imported from there alone (Python started without site, so the editable install of the tests cannot answer),
from a directory that holds no graphs: the shipped graphs come with it, `sagellm run` finds them by name, and
`sagellm serve MODEL` serves on the default graph it ships."""

from __future__ import annotations

import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.tiny_models import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_install_runs_and_serves_the_shipped_graphs_from_any_directory(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(wheels)], check=True)
    (wheel,) = wheels.glob("sagellm-*.whl")
    with zipfile.ZipFile(wheel) as contents:  # built with setuptools-scm present, which finds every file git tracks
        shipped = contents.namelist()
    assert "sagellm/benchmarks/offline.py" in shipped  # `sagellm bench` runs from the wheel
    assert [name for name in shipped if name.startswith("sagellm/benchmarks/results/")] == []
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
        run = ["run", graph, "--model", str(model), "--prompt", "Hi", "--max-tokens", "3", "--temperature", "0"]
        out = python("-m", "sagellm.cli.main", *run)  # greedy: a sampled reply of the random model can be blank
        assert out.strip(), f"sagellm run {graph} printed nothing"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve = [sys.executable, "-S", "-m", "sagellm.cli.main", "serve", str(model), "--no-embedding", "--port", str(port)]
    server = subprocess.Popen(serve, cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        body = {"prompt": "Hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3, reply.text
    finally:
        server.terminate()
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err.decode()[-2000:]
