"""What the chaos benchmark says: a progress line as each phase starts, a `Row` per phase (what was tried, the answers,
server errors and lost requests, both of which must be 0, and the recovery time) and the table of them; with the
arithmetic that fills a row from the ends of its streams (`lost_count`, `status_of`, `tally`)."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass


@dataclass
class Row:
    phase: str
    tried: str
    answers: str
    server_errors: int = 0
    lost: int = 0
    recovery_s: float | None = None


def markdown(rows: list[Row]) -> str:
    lines = ["| phase | tried | answered | 5xx | lost | recovery s |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        recovery = f"{r.recovery_s:.1f}" if r.recovery_s is not None else "—"
        lines.append(f"| {r.phase} | {r.tried} | {r.answers} | {r.server_errors} | {r.lost} | {recovery} |")
    return "\n".join(lines)


def progress(message: str, bench: str = "chaos") -> None:
    print(f"[{bench}] {message}", file=sys.stderr, flush=True)


def lost_count(ends: list[list[str]], ok: set[str]) -> int:
    """Requests with no end, more than one, or an end that is neither an answer nor a clear error."""
    return sum(len(e) != 1 or not (e[0] in ok or e[0][:1].isdigit()) for e in ends)


def status_of(ends: list[str]) -> str:
    """The HTTP status a stream got ("200" once streaming), or what ended it otherwise ("transport ...")."""
    if len(ends) != 1:
        return f"{len(ends)} ends"
    end = ends[0]
    return end.split()[0] if end[:1].isdigit() else end if end.startswith("transport") else "200"


def tally(values: list[str]) -> str:
    return ", ".join(f"{name} ×{count}" for name, count in Counter(values).most_common())
