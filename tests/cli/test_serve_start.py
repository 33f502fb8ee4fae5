"""`sagellm serve`'s first minute as a new user meets it: a port in use said in one line before anything loads (and
`gateway start` in the same words), one plain line when it is ready, logs a person reads on a terminal and JSON lines
through a pipe, a local model path that is not there named as such (by `generate` too), the second small built-in
model for models on demand, and the kernels' first build counted in steps."""

from __future__ import annotations

import json
import os
import pty
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from sagellm.backends.native import build, isa
from sagellm.cli.progress_display import _IMPORTED, seconds_since_start
from sagellm.cli.serve_cmd import _preset_engine
from sagellm.common import progress
from sagellm.gateway.control.engine_spec import pooled_spec
from sagellm.gateway.http.port import PortInUse, check_port_free
from sagellm.gateway.http.server import _listen
from sagellm.runtime.models.model_cache import ModelCacheError, looks_like_path, resolve_model
from tests.cli.test_cli import SAGELLM
from tests.cli.test_gateway_cli import free_port
from tests.tiny_models import make_tiny_llama

IN_USE = "port {port} is in use; pick another with --port (0: any free port)"
READY = re.compile(r"^sagellm serve: serving (.+) on (http://\S+) \(ready in ([\d.]+) s; Ctrl-C to stop\)$")


def sagellm(
    home: Path, *args: str, cwd: Path | None = None, timeout: float = 120, **env_vars: str
) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAGELLM_HOME": str(home), "SAGELLM_LOG_LEVEL": "warning", **env_vars}
    return subprocess.run([SAGELLM, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def one_error_line(ran: subprocess.CompletedProcess, command: str) -> str:
    """The one line a failed command printed (stderr holds nothing else), without its `sagellm CMD: error: `."""
    lines = ran.stderr.splitlines()
    assert ran.returncode == 2 and len(lines) == 1, ran.stderr
    assert lines[0].startswith(f"sagellm {command}: error: "), ran.stderr
    return lines[0].removeprefix(f"sagellm {command}: error: ")


@pytest.fixture
def taken_port():
    """A port another process listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


# -- a port in use ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_on_a_port_in_use_says_so_in_one_line_before_loading_anything(taken_port, tmp_path):
    """Twice (`serve` run twice meets its own port taken); the default model is not cached in this home, so a serve
    that looked at it first would download it: the home stays empty, and it fails in the time the CLI takes to start."""
    for _ in range(2):
        started = time.monotonic()
        ran = sagellm(tmp_path, "serve", "smollm2-135m-instruct", "--port", str(taken_port))
        assert one_error_line(ran, "serve") == IN_USE.format(port=taken_port)
        assert time.monotonic() - started < 15  # the CLI's own start (~1 s) on a busy machine; a model takes minutes
        assert not (tmp_path / "models").exists()  # nothing fetched, nothing loaded


@pytest.mark.slow
def test_gateway_start_says_a_port_in_use_in_the_same_words(taken_port, tmp_path):
    ran = sagellm(tmp_path, "gateway", "start", "--port", str(taken_port), "--state-dir", str(tmp_path / "state"))
    assert one_error_line(ran, "gateway") == IN_USE.format(port=taken_port)


def test_the_check_passes_a_free_port_and_port_0(taken_port):
    check_port_free("127.0.0.1", free_port())
    check_port_free("127.0.0.1", 0)
    with pytest.raises(PortInUse, match=f"port {taken_port} is in use"):
        check_port_free("127.0.0.1", taken_port)


def test_a_port_taken_after_the_check_is_the_same_error_from_the_server_s_bind(taken_port):
    with pytest.raises(PortInUse, match=f"port {taken_port} is in use"):
        trio.run(_listen, "127.0.0.1", taken_port, False)


# -- ready line and log format ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_says_where_it_serves_once_ready_and_logs_json_lines_through_a_pipe(tmp_path):
    model = make_tiny_llama(tmp_path / "tiny")
    port = free_port()
    command = [SAGELLM, "serve", str(model), "--port", str(port), "--no-embedding", "--kv-cache-memory-gb", "0.05"]
    env = {**os.environ, "SAGELLM_HOME": str(tmp_path / "home")}
    started = time.monotonic()
    server = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    try:
        timer = threading.Timer(180, server.kill)  # a server that never gets ready ends the read
        timer.start()
        for line in server.stderr:
            lines.append(line.rstrip("\n"))
            if READY.match(lines[-1]):
                break
        waited = time.monotonic() - started
        timer.cancel()
    finally:
        server.terminate()
        server.wait(60)
    ready = READY.match(lines[-1])
    assert ready, "\n".join(lines)
    assert ready.group(1) == str(model) and ready.group(2) == f"http://127.0.0.1:{port}"
    assert 0.7 * waited - 1 < float(ready.group(3)) <= waited + 0.5  # since the command started, not the load
    events = [json.loads(line)["event"] for line in lines if line.startswith("{")]
    assert "gateway_ready" in events and not any("[info" in line for line in lines), lines  # no console lines


LOG_ONE_EVENT = (
    "import structlog; from sagellm.common.logging import configure_logging; configure_logging('info'); "
    "structlog.get_logger('t').info('hello', answer=42)"
)


def logged_through(terminal: bool, **env: str) -> str:
    """What one event looks like on stderr, a terminal's (a pty) or a pipe's."""
    environ = {k: v for k, v in os.environ.items() if k != "SAGELLM_LOG_FORMAT"} | env
    if not terminal:
        return subprocess.run([sys.executable, "-c", LOG_ONE_EVENT], capture_output=True, text=True, env=environ,
                              timeout=60).stderr  # fmt: skip
    main, other = pty.openpty()
    try:
        subprocess.run([sys.executable, "-c", LOG_ONE_EVENT], stderr=other, env=environ, timeout=60, check=True)
        os.close(other)
        other = -1
        out = b""
        while chunk := _read(main):
            out += chunk
        return out.decode()
    finally:
        os.close(main)
        if other >= 0:
            os.close(other)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # the pty's other end closed: all read
        return b""


@pytest.mark.slow  # three interpreters
def test_logs_are_console_lines_on_a_terminal_and_json_through_a_pipe_or_when_asked():
    console = logged_through(terminal=True)
    assert "hello" in console and "answer" in console and not console.lstrip().startswith("{"), console
    assert json.loads(logged_through(terminal=False))["answer"] == 42
    assert json.loads(logged_through(terminal=True, SAGELLM_LOG_FORMAT="json"))["event"] == "hello"


# -- local paths that are not there -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["./name.gguf", "./dir", "../models/x", "/abs/path", "~/nowhere", "m.safetensors"])
def test_a_path_that_is_not_there_is_named_as_such(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_path(name)
    with pytest.raises(ModelCacheError, match=f"^{re.escape(name)}: no such file or directory$"):
        resolve_model(name)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "org/name.v2"])
def test_model_names_are_not_paths(name):
    assert not looks_like_path(name)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "path"),
    [
        (("serve", "./my-model.gguf"), "./my-model.gguf"),
        (("serve", "--model", "code=./my-model"), "./my-model"),  # a model on demand
        (("generate", "-p", "Hi", "-m", "./my-model"), "./my-model"),
        (("run", "colocated", "--model", "./my-model", "--prompt", "Hi"), "./my-model"),
    ],
)
def test_serve_run_and_generate_name_a_missing_local_model_in_one_line(args, path, tmp_path):
    """Before anything heavy is imported: torch (5-10 s) never is, so the line comes in the CLI's own start (~0.5 s;
    3 s allows for a busy machine). Python's import log (PYTHONPROFILEIMPORTTIME) says what was imported."""
    port = ("--port", str(free_port())) if args[0] == "serve" else ()
    started = time.monotonic()
    ran = sagellm(tmp_path / "home", *args, *port, cwd=tmp_path, PYTHONPROFILEIMPORTTIME="1")
    took = time.monotonic() - started
    imports = [line for line in ran.stderr.splitlines() if line.startswith("import time:")]
    assert imports and not any(line.rsplit("|", 1)[1].strip() == "torch" for line in imports)
    ran.stderr = "\n".join(line for line in ran.stderr.splitlines() if not line.startswith("import time:"))
    assert one_error_line(ran, args[0]) == f"{path}: no such file or directory"
    assert took < 3, f"{took:.1f} s"
    assert "download" not in ran.stderr.lower() and "Hugging Face" not in ran.stderr


# -- the second small model ---------------------------------------------------------------------------------------
def test_smollm2_lite_is_a_second_small_model_over_the_default_weights():
    fields = _preset_engine("lite", "smollm2-lite")
    assert fields is not None and fields["model"] == "smollm2-135m-instruct" and fields["kind"] == "llm"
    assert fields["engine"] == {"max_model_len": 1024, "max_num_seqs": 4}
    spec = pooled_spec("lite", fields, {"max_num_seqs": 8})  # its own settings over the engine flags
    assert spec.served_model_name == "lite" and spec.engine["max_num_seqs"] == 4


# -- first-run kernel build, "ready in" -----------------------------------------------------------------------------
def test_the_kernel_build_says_what_it_compiles_how_long_it_takes_and_counts_its_steps(tmp_path, monkeypatch):
    def compiled(command: list[str], what: str) -> None:
        Path(command[command.index("-o") + 1]).write_bytes(b"")  # the object or the library, as the compiler would
        time.sleep(0.01)

    seen: list[str] = []
    monkeypatch.setattr(build, "_run", compiled)
    with progress.listening(lambda: seen.append((progress.current() or ("",))[0])):
        build._compile("cc", isa.chosen(), tmp_path, tmp_path / "kernels.so")
    steps = len(build.SOURCES) + 1
    said = list(dict.fromkeys(s for s in seen if s))
    heading = f"compiling the CPU kernels for {isa.chosen().name}, once per machine ({build.COMPILE_ESTIMATE})"
    assert said[0] == heading
    assert said[1:] == [f"{heading} · {done} of {steps} steps done" for done in range(steps - 1)] + [
        f"{heading} · {steps - 1} of {steps} steps done: linking"
    ]


def test_ready_in_counts_from_the_process_s_start():
    """The process started before the module that says it was imported (pytest's own start-up, the imports)."""
    assert seconds_since_start() > time.monotonic() - _IMPORTED
