"""How much of this process's cores other programs use: the cores' busy time (/proc/stat, per core) less this process's
own CPU time, over the time between two readings.

A parallel step of N threads waits for its slowest thread, and a thread that shares its core with a busy program
waits a scheduler time slice each time it loses the core: on 2 cores with one `yes > /dev/null` beside the engine, two
threads decode ~10x slower than quiet, one thread about 1.5x. What others use, rather than how long our own threads
wait to run, tells the two apart whatever thread count runs now: a wait measured at one thread says nothing of two.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

PROC_STAT = Path("/proc/stat")
# /proc/stat's per-core fields: user nice system idle iowait irq softirq steal guest guest_nice (guest time is
# counted in user already). Busy: all but idle and iowait; steal is a hypervisor's other guests on this core.
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


class CoreLoad:
    """Reads, on each `sample()`, the cores' worth of CPU time others used on `cores` since the last one."""

    def __init__(self, cores: list[int], stat: Path = PROC_STAT, clock: Callable[[], float] = time.monotonic) -> None:
        self._names = {f"cpu{core}" for core in cores}
        self._stat, self._clock = stat, clock
        self._tick = 1 / _clock_ticks()
        self._last = self._read()

    @classmethod
    def of(cls, cores: list[int], stat: Path = PROC_STAT) -> CoreLoad | None:
        """A reader for `cores`, or None where the kernel does not say (not Linux, /proc hidden, a core missing)."""
        try:
            return cls(cores, stat)
        except (OSError, ValueError, KeyError):
            return None

    def sample(self) -> float:
        """Cores' worth used by other processes on these cores since the previous sample (0.0 to len(cores)): the
        cores' busy seconds, less this process's, over the wall time between."""
        now = self._read()
        (wall, busy, own), (wall0, busy0, own0) = now, self._last
        self._last = now
        elapsed = wall - wall0
        if elapsed <= 0:
            return 0.0
        others = (busy - busy0) - (own - own0)
        return max(0.0, others / elapsed)

    def _read(self) -> tuple[float, float, float]:
        """(wall seconds, the cores' busy seconds, this process's CPU seconds), read together."""
        wall, own = self._clock(), time.process_time()
        ticks, found = 0, 0
        for line in self._stat.read_text().splitlines():
            name, _, rest = line.partition(" ")
            if name in self._names:
                fields = rest.split()
                ticks += sum(int(fields[i]) for i in BUSY_FIELDS)
                found += 1
        if found != len(self._names):
            raise KeyError(f"{self._stat} lists {found} of the {len(self._names)} cores")
        return wall, ticks * self._tick, own


def _clock_ticks() -> int:
    """/proc/stat's unit: clock ticks a second (USER_HZ, 100 on Linux)."""
    return os.sysconf("SC_CLK_TCK")
