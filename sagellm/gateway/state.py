"""A gateway's files in its state directory: where `sagellm gateway start` records the background gateway (pid, URL,
log) so the CLI and the Python client find it; the gateway itself keeps its admin key and sessions there too."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

PID_FILE, RECORD_FILE, LOG_FILE = "gateway.pid", "gateway.json", "gateway.log"


@dataclass
class GatewayRecord:
    """What `gateway.json` holds about a gateway started in the background."""

    url: str
    pid: int
    started_at: float
    log: str


def write_record(state_dir: Path, record: GatewayRecord) -> None:
    (state_dir / PID_FILE).write_text(f"{record.pid}\n")
    (state_dir / RECORD_FILE).write_text(json.dumps(asdict(record), indent=2) + "\n")


def read_record(state_dir: Path) -> GatewayRecord | None:
    try:
        return GatewayRecord(**json.loads((state_dir / RECORD_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def remove_record(state_dir: Path) -> None:
    for name in (PID_FILE, RECORD_FILE):
        (state_dir / name).unlink(missing_ok=True)


def engine_log_hint(engine_id: str, log_file: Path) -> str:
    """Where an engine's log is, as its failure text says it to callers: by file and engine, never by the state
    directory's absolute path, which tells a caller how this host is laid out (the gateway's own log names it)."""
    return f"log: {log_file.name} of engine {engine_id} in the gateway's state directory"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file ("" if there is none), for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
