"""The background gateway's lifecycle as a user drives it, every step a real `sagellm` subprocess on a tiny Llama:
`gateway start` -> `status` -> `engine start` -> `engine list` -> chat served by the engine -> the engine's process
killed and restarted -> `engine stop` -> `gateway stop`. A command costs a Python start-up (seconds on busy cores),
so the side steps (a second start refused, `preset apply` of an openai engine, `gateway logs`) run the same `main()`
in this process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.cli.in_process import in_process
from tests.cli.test_cli import SAGELLM
from tests.tiny_models import make_tiny_llama

CHAT = [{"role": "user", "content": "Hello world"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("gateway-cli") / "tiny-llama")


def sagellm(home: Path, *args: str, timeout: float = 240, input_text: str = "") -> subprocess.CompletedProcess:
    """The CLI in a subprocess with SAGELLM_HOME=`home`; `input_text` is its stdin (a pipe, never the terminal)."""
    env = dict(os.environ, SAGELLM_HOME=str(home), COLUMNS="200")
    env.pop("SAGELLM_ADMIN_KEY", None)
    return subprocess.run([SAGELLM, *args], capture_output=True, text=True, timeout=timeout, env=env, input=input_text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine(home: Path, engine_id: str) -> dict:
    listed = sagellm(home, "engine", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return next(e for e in json.loads(listed.stdout) if e["id"] == engine_id)


@pytest.mark.slow
def test_gateway_lifecycle(tiny, tmp_path, capsys, monkeypatch):
    home, port = tmp_path / "home", free_port()
    state = home / "gateway"
    url = f"http://127.0.0.1:{port}"
    try:
        started = sagellm(home, "gateway", "start", "-m", str(tiny), "--no-embedding", "--port", str(port),
                          "--allowed-upstream", "127.0.0.1")  # the preset below attaches the gateway itself
        assert started.returncode == 0, started.stderr + (state / "gateway.log").read_text()
        assert "gateway ready" in started.stderr and url in started.stderr
        record = json.loads((state / "gateway.json").read_text())
        assert record["url"] == url and (state / "gateway.pid").read_text().strip() == str(record["pid"])

        again = in_process(capsys, monkeypatch, home, "gateway", "start", "-m", str(tiny), "--port", str(free_port()))
        assert again.code == 1 and "already running" in again.err

        status = sagellm(home, "gateway", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert url in status.stdout and "ok" in status.stdout and "graph" in status.stdout

        start = sagellm(home, "engine", "start", str(tiny), "--served-model-name", "tiny-b", "--label", "extra")
        assert start.returncode == 0, start.stdout + start.stderr
        llm = engine(home, "llm-1")
        assert (llm["state"], llm["model"], llm["label"], llm["restarts"]) == ("ready", "tiny-b", "extra", 0)

        chat = {"model": "tiny-b", "messages": CHAT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "tiny-b" and reply.json()["usage"]["completion_tokens"] == 5

        os.kill(llm["pid"], signal.SIGKILL)  # the engine dies: the gateway restarts it
        restarted = _wait(url, state, "llm-1", lambda e: e["restarts"] == 1 and e["state"] == "ready")
        assert restarted["pid"] != llm["pid"] and "killed by SIGKILL" in restarted["last_error"]
        again_reply = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        assert again_reply.json()["choices"][0]["message"] == reply.json()["choices"][0]["message"]

        preset = tmp_path / "loop.yaml"  # an openai engine: the gateway itself, under another name
        preset.write_text(
            "version: 1\nname: loop\nengines:\n"
            f"  - {{name: loop, kind: openai, model: '{tiny}', url: '{url}', served_model_name: loop}}\n"
        )
        applied = in_process(capsys, monkeypatch, home, "preset", "apply", "--file", str(preset), "-y")
        assert applied.code == 0 and "openai-2" in applied.out, applied.out + applied.err
        looped = httpx.post(f"{url}/v1/chat/completions", json=chat | {"model": "loop"}, timeout=60)
        assert looped.json()["choices"][0]["message"] == reply.json()["choices"][0]["message"]

        stop = sagellm(home, "engine", "stop", "llm-1")
        assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).status_code == 404

        logs = in_process(capsys, monkeypatch, home, "gateway", "logs", "-n", "50")
        assert logs.code == 0 and "engine_stopped" in logs.out
    finally:
        stopped = sagellm(home, "gateway", "stop")
    assert stopped.returncode == 0 and "gateway stopped" in stopped.stderr, stopped.stderr
    assert not (state / "gateway.pid").exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def _wait(url: str, state: Path, engine_id: str, done: Callable[[dict], bool], timeout: float = 180) -> dict:
    """Polls the management API (quicker than a `sagellm engine list` per poll) until `done(engine)`."""
    headers = {"authorization": f"Bearer {(state / 'admin.key').read_text().strip()}"}
    deadline = time.monotonic() + timeout
    while True:
        found = httpx.get(f"{url}/v1/management/engines/{engine_id}", headers=headers).json()
        if done(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_commands_without_a_gateway_say_how_to_start_one(tmp_path, capsys, monkeypatch):
    for args in (("engine", "list"), ("gateway", "stop"), ("preset", "apply", "--name", "smollm2-cpu", "-y")):
        result = in_process(capsys, monkeypatch, tmp_path, *args)
        assert result.code in (1, 2) and "no gateway is running" in result.err
    status = in_process(capsys, monkeypatch, tmp_path, "gateway", "status")
    assert status.code == 1 and "sagellm gateway start" in status.out
