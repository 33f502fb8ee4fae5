"""Multi-turn conversations the gateway keeps, so a client can send only its new message.

A session is a list of chat messages; `POST /sessions/{id}/chat` appends the user's message, runs a chat completion
over the whole history through the same pipeline as `/v1/chat/completions`, and appends the reply. Sessions live in
one JSON file under the state directory, readable by its owner only, rewritten atomically (temp file + rename) on
every change, so a restarted gateway has them all and a crash mid-write never leaves a torn file. A file that cannot
be read (damaged by hand, or by a full disk) is moved aside as `sessions.json.bad-TIME` with a warning naming it, and
the gateway starts with no sessions rather than not at all."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import structlog

from sagellm.gateway.auth import write_private

SESSIONS_FILE = "sessions.json"
log = structlog.get_logger("sagellm.gateway")


class Session(msgspec.Struct, kw_only=True):
    id: str
    created: float
    updated: float
    title: str | None = None
    messages: list[dict[str, Any]] = msgspec.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "created": self.created, "updated": self.updated,
                "num_messages": len(self.messages)}  # fmt: skip


class SessionStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SESSIONS_FILE
        self.sessions: dict[str, Session] = {}
        if self.path.exists():
            self.sessions = {s.id: s for s in self._load()}

    def _load(self) -> list[Session]:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=list[Session])
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as error:
            kept = self.path.with_name(f"{self.path.name}.bad-{int(time.time())}")
            os.replace(self.path, kept)
            log.warning("sessions_file_unreadable", path=str(self.path), moved_to=str(kept), problem=str(error))
            return []

    def create(self, title: str | None = None, messages: list[dict[str, Any]] | None = None) -> Session:
        now = time.time()
        session = Session(id=f"sess-{uuid.uuid4().hex[:16]}", created=now, updated=now, title=title,
                          messages=list(messages or []))  # fmt: skip
        self.sessions[session.id] = session
        self._save()
        return session

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def append(self, session: Session, *messages: dict[str, Any]) -> None:
        session.messages.extend(messages)
        session.updated = time.time()
        self._save()

    def delete(self, session_id: str) -> bool:
        found = self.sessions.pop(session_id, None) is not None
        if found:
            self._save()
        return found

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_private(self.path, msgspec.json.encode(sorted(self.sessions.values(), key=lambda s: s.created)))
