"""Start-up progress on stderr: what each process of the run waits for (`sagellm.common.progress`), and for how long.

On a terminal it is a live block, one line per busy process, redrawn four times a second and gone when start-up
ends; otherwise (a log file, CI) one line each time a process moves on to something new, so a slow start still says
where it is. "Ready in" lines count from the process's start (`seconds_since_start`)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sagellm.common import progress

_IMPORTED = time.monotonic()  # the start, where the process's own is not to be read


def seconds_since_start() -> float:
    """How long this process has run: what its user waited since pressing Enter, the imports, the model's download
    and the kernels' build included (Linux's process start time; elsewhere since this module was imported)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()  # after the command's name, which may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: clock ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _IMPORTED


@contextmanager
def showing_progress(command: str) -> Iterator[None]:
    """Shows progress while the block runs; `command` prefixes each line ("sagellm run")."""
    if sys.stderr.isatty():
        with _live(command):
            yield
    else:
        with progress.listening(_LinePrinter(command)):
            yield


@contextmanager
def _live(command: str) -> Iterator[None]:
    from rich.console import Console
    from rich.live import Live
    from rich.spinner import Spinner
    from rich.table import Table

    def render() -> Any:
        table = Table.grid(padding=(0, 1))
        for who, (what, seconds) in sorted(progress.snapshot().items()):
            table.add_row(Spinner("dots"), f"{command}: {who}: {what}", f"[dim]{seconds:.1f} s")
        return table

    with (
        progress.listening(lambda: None),
        Live(get_renderable=render, console=Console(stderr=True), refresh_per_second=4, transient=True),
    ):
        yield


class _LinePrinter:
    """Prints a process's stage when it changes (not its seconds: a line per second would bury the log)."""

    def __init__(self, command: str) -> None:
        self.command = command
        self._shown: dict[str, str] = {}
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            for who, (what, _) in sorted(progress.snapshot().items()):
                if self._shown.get(who) != what:
                    self._shown[who] = what
                    print(f"{self.command}: {who}: {what}", file=sys.stderr, flush=True)
