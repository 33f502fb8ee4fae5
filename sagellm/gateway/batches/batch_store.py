"""The batches' records and results under the state directory, so a batch outlives the gateway that ran it.

`STATE/batches/ID.json` is a batch's record (OpenAI's batch object and a digest of the key that created it),
rewritten at each change of status; `ID.out.jsonl` and `ID.err.jsonl` gather its requests' results as each one
finishes, one line each in OpenAI's batch output format (the error file: the results whose status is not 200). A
restarted gateway reads which `custom_id`s are done from those files and runs the rest; a line cut short by a crash
is ignored (its request runs again). All of it readable by its owner only."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import msgspec

from sagellm.common.private_files import write_private
from sagellm.gateway.serving.state_records import kept_records

BATCHES_DIR = "batches"
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")


class BatchRecord(msgspec.Struct, kw_only=True):
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    owner: str = ""
    status: str = "validating"
    metadata: dict[str, str] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    errors: list[dict[str, Any]] | None = None  # why validation failed: OpenAI's errors.data
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None

    def public(self) -> dict[str, Any]:
        """OpenAI's batch object (the owner's digest left out)."""
        errors = None if self.errors is None else {"object": "list", "data": self.errors}
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": errors,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window, "status": self.status,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "in_progress_at": self.in_progress_at, "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at, "completed_at": self.completed_at, "failed_at": self.failed_at,
            "expired_at": None, "cancelling_at": self.cancelling_at, "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }  # fmt: skip

    def moved_to(self, status: str) -> None:
        """Its status, and the time it changed (`<status>_at`)."""
        self.status = status
        stamp = f"{status}_at"
        if stamp in self.__struct_fields__:
            setattr(self, stamp, int(time.time()))


class BatchStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / BATCHES_DIR
        self.records = {r.id: r for r in kept_records(self.root, "batch_*.json", BatchRecord)}

    def save(self, record: BatchRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_private(self.root / f"{record.id}.json", msgspec.json.encode(record))
        self.records[record.id] = record

    def append(self, record: BatchRecord, line: dict[str, Any], failed: bool) -> None:
        """One request's result, at the end of the output file or the error file."""
        path = self.results_path(record, failed)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as f:
            f.write(msgspec.json.encode(line) + b"\n")

    def results(self, record: BatchRecord, failed: bool) -> bytes:
        """The whole lines of the output (or error) file so far."""
        path = self.results_path(record, failed)
        data = path.read_bytes() if path.is_file() else b""
        return data[: data.rfind(b"\n") + 1]  # a line a crash cut short is not a result

    def done(self, record: BatchRecord) -> tuple[set[str], int, int]:
        """The custom_ids with a result, and how many of them completed and failed."""
        counts = []
        ids: set[str] = set()
        for failed in (False, True):
            lines = [msgspec.json.decode(line) for line in self.results(record, failed).splitlines() if line]
            ids.update(line["custom_id"] for line in lines)
            counts.append(len(lines))
        return ids, counts[0], counts[1]

    def results_path(self, record: BatchRecord, failed: bool) -> Path:
        return self.root / f"{record.id}.{'err' if failed else 'out'}.jsonl"

    def unfinished(self) -> list[BatchRecord]:
        return [r for r in self.records.values() if r.status in UNFINISHED]
