"""What /proc says of the processes a benchmark started (Linux): their children, command lines, CPU seconds and
resident memory. A process that is gone reads as empty, not as an error: servers under test get killed."""

from __future__ import annotations

import os
from pathlib import Path

from sagellm.common.memory import resident_bytes


def stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first, then the parent's pid); [] once it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def children(pid: int) -> list[int]:
    entries = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [child for child in entries if (fields := stat(child)) and int(fields[1]) == pid]


def cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_text().split("\0")
    except OSError:
        return []


def cpu_seconds(*pids: int, children: bool = False) -> float:
    """User + system CPU seconds the processes have used so far (`children`: and their children that ended and were
    waited for)."""
    fields = [stat(pid) for pid in pids]
    used = range(11, 15) if children else range(11, 13)  # utime, stime[, cutime, cstime]
    return sum(int(f[i]) for f in fields if f for i in used) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    return (resident_bytes(pid=pid) or 0) // 1024
