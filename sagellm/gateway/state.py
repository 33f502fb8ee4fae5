"""A gateway's files in its state directory: where `sagellm gateway start` records the background gateway (pid, URL,
log) so the CLI and the Python client find it; the gateway itself keeps its admin key and sessions there too."""

from __future__ import annotations

import json
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
