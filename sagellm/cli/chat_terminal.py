"""`sagellm chat` at a terminal, as other chat CLIs behave: line editing and a history kept across sessions
(readline: the arrows move and recall earlier lines), and Ctrl-C that stops the reply being written but not the
session.

Ctrl-C during a reply closes its stream: a server sees the connection close and aborts the request, the engine in
this process aborts it (`LLM.stream`), and the prompt comes back. At the prompt, Ctrl-C drops the line; a second one
in a row ends the session, as Ctrl-D does. An engine step is never cut in half by Ctrl-C: the local reply defers it
to the step's end (`interrupts_deferred`)."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

HISTORY_LINES = 1_000  # kept in the history file: the newest ones
PROMPT = ">>> "


@contextlib.contextmanager
def line_editing(history_file: Path) -> Iterator[None]:
    """`input()` with readline's editing and the last HISTORY_LINES lines of `history_file`, written back at the
    end (no readline, as on Windows' Python: plain input)."""
    try:
        import readline
    except ImportError:
        yield
        return
    readline.set_history_length(HISTORY_LINES)
    with contextlib.suppress(OSError):
        readline.read_history_file(history_file)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            history_file.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history_file)


class Prompt:
    """The user's lines; None once the user ends the session (Ctrl-D, or Ctrl-C twice in a row)."""

    def __init__(self) -> None:
        self._interrupted = False  # the last prompt ended with Ctrl-C

    def read(self) -> str | None:
        try:
            return self._read()
        except KeyboardInterrupt:  # one outside input(): pressed again while the notice of the first was written
            print(file=sys.stderr)
            return None

    def _read(self) -> str | None:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                print(file=sys.stderr)
                return None
            except KeyboardInterrupt:
                if self._interrupted:
                    print(file=sys.stderr)
                    return None
                self._interrupted = True
                print("\n(Ctrl-C again or Ctrl-D to exit)", file=sys.stderr)
                continue
            self._interrupted = False
            return line


def write_reply(pieces: Generator[str, None, None]) -> tuple[str, bool]:
    """Writes the reply's pieces to stdout as they come; Ctrl-C stops it, closing `pieces` (the request is aborted
    where it runs). The text written, and whether the user stopped it."""
    written: list[str] = []
    stopped = False
    try:
        for piece in pieces:
            written.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stopped = True
    finally:
        pieces.close()
    sys.stdout.write("\n")
    if stopped:
        print("(stopped)", file=sys.stderr)
    return "".join(written), stopped


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C inside the block is raised (KeyboardInterrupt) when the block ends, not in its middle: what runs in it
    (an engine step) finishes first."""
    pressed = False

    def note(signum: int, frame: object) -> None:
        nonlocal pressed
        pressed = True

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt
