"""`sagellm chat` at a terminal, as a user types into it (a pseudo-terminal of its own, against a real server): Ctrl-C
stops a reply, the server aborts its request and the session goes on; the Up arrow recalls the last line, which is
kept in $SAGELLM_HOME/chat_history; `/clear` answers; Ctrl-C twice at the prompt ends the session, exit code 0; the
same with the engine in the command's own process. And, in the test's process, the two pieces Ctrl-C goes through:
a reply's stream closed when it is stopped, an engine step never cut in half."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Generator
from pathlib import Path

import pytest

from sagellm.cli.chat_terminal import PROMPT, interrupts_deferred, write_reply
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama

SAGELLM = shutil.which("sagellm", path=str(Path(sys.executable).parent)) or "sagellm"
UP_ARROW, CTRL_C = "\x1b[A", "\x03"

# How long a person takes at least to press a key after the prompt shows: CPython's readline waits for input in a
# select() it enters after drawing the prompt, and a Ctrl-C in the moment between is handled only at the next key.
AT_PROMPT_S = 0.2


class Terminal:
    """A command on a pseudo-terminal of its own (its controlling terminal: Ctrl-C typed is its SIGINT)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes the command
            os.execve(argv[0], argv, env)
        self.unread = ""

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def expect(self, text: str, timeout_s: float = 60) -> str:
        """Reads until `text` appears; what came before it since the last call (the text itself is consumed)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.unread:
            left = deadline - time.monotonic()
            assert left > 0 and self._read(left), f"{text!r} not seen; the terminal shows {self.unread[-1500:]!r}"
        before, _, self.unread = self.unread.partition(text)
        return before

    def wait_for_output(self, chars: int = 8, timeout_s: float = 60) -> None:
        """Until at least `chars` more characters came (a reply has begun)."""
        deadline = time.monotonic() + timeout_s
        while len(self.unread) < chars:
            left = deadline - time.monotonic()
            assert left > 0 and self._read(left), f"no output; the terminal shows {self.unread[-1500:]!r}"

    def exit_code(self, timeout_s: float = 30) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._read(0.1)  # drain, so the command never blocks writing
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"still running; the terminal shows {self.unread[-1500:]!r}")

    def _read(self, timeout_s: float) -> bool:
        """Whether the command is still there to read from."""
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the command has exited
            return False
        self.unread += chunk.decode(errors="replace")
        return bool(chunk)


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """Ctrl-C as a user's process has it: KeyboardInterrupt here, the default in the commands started (an ignored
    SIGINT is inherited across exec). What ran before in this worker may have left it ignored or handled elsewise
    (seen once in a while in CI's shared workers), which these tests are not about."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    if previous is not signal.default_int_handler:  # the warnings summary names what left it so
        warnings.warn(f"SIGINT's handler was {previous!r} before this test; set to the default for it", stacklevel=1)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A long context, so that a greedy reply is still streaming when Ctrl-C comes."""
    return make_tiny_llama(tmp_path_factory.mktemp("chat") / "tiny-llama", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(tiny: Path, tmp_path_factory):
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path_factory.mktemp("gateway")), tiny) as gw:
        yield gw


def _idle(server) -> bool:
    (engine,) = server.core.nodes_of("engine").values()
    deadline = time.monotonic() + 30
    while (server.call(engine.in_flight) or server.core.in_flight) and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.call(engine.in_flight) == [] and server.core.in_flight == 0


@pytest.mark.slow
def test_ctrl_c_stops_the_reply_and_keeps_the_session_and_up_recalls_the_last_line(server, tmp_path: Path):
    home = tmp_path / "home"
    env = dict(os.environ, SAGELLM_HOME=str(home), TERM="xterm")
    command = [SAGELLM, "chat", "--url", server.url, "--temperature", "0", "--max-tokens", "3000"]
    chat = Terminal(command, env)
    chat.expect(PROMPT)
    chat.type("Hello there\r")
    chat.expect("Hello there\r\n")
    chat.wait_for_output()  # the reply is streaming
    chat.type(CTRL_C)
    chat.expect("(stopped)")
    chat.expect(PROMPT)
    assert _idle(server)  # the closed stream reached the engine: the request was aborted
    chat.type(UP_ARROW)
    chat.expect("Hello there")  # recalled, ready to send again
    chat.type("\r")
    chat.wait_for_output(20)  # the session goes on: a second reply
    chat.type(CTRL_C)
    chat.expect("(stopped)")
    chat.expect(PROMPT)
    chat.type("/clear\r")
    chat.expect("(conversation cleared)")
    chat.expect(PROMPT)
    time.sleep(AT_PROMPT_S)
    chat.type(CTRL_C)
    chat.expect("Ctrl-C again")
    chat.expect(PROMPT)
    time.sleep(AT_PROMPT_S)
    chat.type(CTRL_C)
    assert chat.exit_code() == 0
    history = (home / "chat_history").read_text()
    assert "Hello there" in history and "/clear" in history


@pytest.mark.slow
def test_ctrl_c_stops_a_reply_of_the_engine_in_this_process_and_the_next_line_is_answered(tiny: Path, tmp_path: Path):
    """The same with no server: the engine runs in the command's process, and its step is not cut by Ctrl-C."""
    env = dict(os.environ, SAGELLM_HOME=str(tmp_path / "home"), TERM="xterm")
    chat = Terminal([SAGELLM, "chat", str(tiny), "--temperature", "0", "--max-tokens", "3000"], env)
    chat.expect(PROMPT, timeout_s=120)
    for line in ("Hello there", "And again"):
        chat.type(line + "\r")
        chat.expect(line + "\r\n")
        chat.wait_for_output()
        chat.type(CTRL_C)
        chat.expect("(stopped)")
        chat.expect(PROMPT)
    chat.type("\x04")  # Ctrl-D
    assert chat.exit_code() == 0


def test_a_stopped_reply_closes_its_stream(capsys):
    closed = []

    def reply() -> Generator[str, None, None]:
        try:
            yield "one "
            os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, while the reply is being written
            yield "two "
            yield "three"
        finally:
            closed.append(True)  # a server's stream closes here, an engine's request is aborted

    written, stopped = write_reply(reply())
    assert stopped and closed == [True]
    assert written.startswith("one ") and "three" not in written
    assert "(stopped)" in capsys.readouterr().err


def test_ctrl_c_inside_a_deferred_block_is_raised_when_it_ends():
    steps, handler = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)  # mid-step
        steps.append("the step finished")
    assert steps == ["the step finished"]
    assert signal.getsignal(signal.SIGINT) is handler  # put back
