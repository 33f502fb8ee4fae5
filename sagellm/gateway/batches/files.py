"""OpenAI's Files API's store: uploaded files and the batches' output files, under the state directory.

Each file is two files of its own in `STATE/files/`, readable by their owner only: `ID` (the bytes) and `ID.json`
(its record: name, purpose, size, time, and a digest of the API key that owns it, never the key). Another key's file
is as good as absent. A file is at most the gateway's body limit when uploaded (`--max-body-bytes`); a key keeps at
most MAX_FILES files and MAX_OWNER_BYTES in all, so one client cannot fill the disk."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import msgspec
import structlog

from sagellm.common.private_files import write_private
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.state_records import kept_records

FILES_DIR = "files"
MAX_FILES = 500  # per API key
MAX_OWNER_BYTES = 2 << 30  # per API key, uploads and outputs together
PURPOSES = ("batch", "batch_output", "user_data", "evals", "fine-tune", "assistants", "vision")
log = structlog.get_logger("sagellm.gateway")


class FileRecord(msgspec.Struct, kw_only=True):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    owner: str = ""

    def public(self) -> dict[str, object]:
        """OpenAI's file object (the owner's digest left out)."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": None, "status_details": None}  # fmt: skip


class FileStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / FILES_DIR
        kept = kept_records(self.root, "file-*.json", FileRecord)
        self.records = {r.id: r for r in kept if (self.root / r.id).is_file()}

    def add(self, owner: str, filename: str, purpose: str, data: bytes) -> FileRecord:
        """Keeps `data` as a new file of `owner`'s; a 400 past the key's limits."""
        owned = self.owned_by(owner)
        if len(owned) >= MAX_FILES:
            raise ApiError(400, f"this key already keeps {MAX_FILES} files, the most it may; delete one")
        if sum(r.bytes for r in owned) + len(data) > MAX_OWNER_BYTES:
            raise ApiError(400, f"this key's files would pass {MAX_OWNER_BYTES >> 20} MiB in all; delete some")
        record = FileRecord(id=f"file-{secrets.token_hex(12)}", bytes=len(data), created_at=int(time.time()),
                            filename=filename, purpose=purpose, owner=owner)  # fmt: skip
        self.root.mkdir(parents=True, exist_ok=True)
        write_private(self.root / record.id, data)
        write_private(self.root / f"{record.id}.json", msgspec.json.encode(record))
        self.records[record.id] = record
        return record

    def owned_by(self, owner: str) -> list[FileRecord]:
        return sorted((r for r in self.records.values() if r.owner == owner), key=lambda r: r.created_at)

    def get(self, file_id: str, owner: str) -> FileRecord:
        """The file if `owner` owns it; a 404 naming it otherwise (another key's file is as good as absent)."""
        record = self.records.get(file_id)
        if record is None or record.owner != owner:
            raise ApiError(404, f"no file {file_id!r}", code="not_found", param="file_id")
        return record

    def content(self, file_id: str, owner: str) -> bytes:
        return (self.root / self.get(file_id, owner).id).read_bytes()

    def delete(self, file_id: str, owner: str) -> None:
        record = self.get(file_id, owner)
        (self.root / f"{record.id}.json").unlink(missing_ok=True)
        (self.root / record.id).unlink(missing_ok=True)
        del self.records[record.id]
