"""Multi-turn conversations the gateway keeps, so a client can send only its new message.

A session is a list of chat messages; `POST /sessions/{id}/chat` appends the user's message, runs a chat completion
over the whole history through the same pipeline as `/v1/chat/completions`, and appends the reply. A session
belongs to the API key that created it (a digest of the key is kept, never the key): another key neither sees it nor
changes it. Each key holds at most `MAX_SESSIONS` sessions of at most `MAX_SESSION_BYTES` of message text, so one
client cannot grow the store, or the time each save takes, without bound.

Sessions live in one JSON file under the state directory, readable by its owner only. Each change is encoded on the
event loop (bounded by the limits above) and written by a worker thread, one write at a time, atomically (temp file
+ rename): a restarted gateway has them all and a crash mid-write never leaves a torn file. A file that cannot be
read (damaged by hand, or by a full disk) is moved aside as `sessions.json.bad-TIME` with a warning naming it, and
the gateway starts with no sessions rather than not at all."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import structlog
import trio

from sagellm.common.errors import InvalidInput
from sagellm.gateway.http.auth import write_private

SESSIONS_FILE = "sessions.json"
MAX_SESSIONS = 64  # per API key
MAX_SESSION_BYTES = 256 * 1024  # of message text per session
log = structlog.get_logger("sagellm.gateway")


class SessionLimitError(InvalidInput):
    """A key's session count, or a session's size, would pass its limit (a 400 its routes answer with)."""

    code = "session_limit"


class Session(msgspec.Struct, kw_only=True):
    id: str
    created: float
    updated: float
    title: str | None = None
    messages: list[dict[str, Any]] = msgspec.field(default_factory=list)
    owner: str = ""  # digest of the API key that created it ("": a gateway without API keys)

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "created": self.created, "updated": self.updated,
                "num_messages": len(self.messages)}  # fmt: skip

    def public(self) -> dict[str, Any]:
        """What a client reads of it (not the owner's digest)."""
        return {**self.summary(), "messages": self.messages}

    @property
    def text_bytes(self) -> int:
        return sum(len(str(m.get("content") or "").encode()) for m in self.messages)


class SessionStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SESSIONS_FILE
        self.sessions: dict[str, Session] = {}
        self._write_lock = trio.Lock()
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

    def owned_by(self, owner: str) -> list[Session]:
        return [s for s in self.sessions.values() if s.owner == owner]

    def get(self, session_id: str, owner: str) -> Session | None:
        """The session if `owner` created it (another key's session is as good as absent)."""
        session = self.sessions.get(session_id)
        return session if session is not None and session.owner == owner else None

    def create(self, owner: str, title: str | None = None, messages: list[dict[str, Any]] | None = None) -> Session:
        if len(self.owned_by(owner)) >= MAX_SESSIONS:
            raise SessionLimitError(f"this key already has {MAX_SESSIONS} sessions, the most it may keep; delete one")
        now = time.time()
        session = Session(id=f"sess-{uuid.uuid4().hex[:16]}", created=now, updated=now, title=title, owner=owner)
        self.append(session, *(messages or []))
        self.sessions[session.id] = session
        return session

    def check_room(self, session: Session, *messages: dict[str, Any]) -> None:
        """Raises SessionLimitError if `messages` would take the session past MAX_SESSION_BYTES."""
        added = sum(len(str(m.get("content") or "").encode()) for m in messages)
        if session.text_bytes + added > MAX_SESSION_BYTES:
            raise SessionLimitError(
                f"the session would hold {session.text_bytes + added} bytes of messages, over its limit of "
                f"{MAX_SESSION_BYTES}; start a new session"
            )

    def append(self, session: Session, *messages: dict[str, Any]) -> None:
        self.check_room(session, *messages)
        session.messages.extend(messages)
        session.updated = time.time()

    def delete(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    async def save(self) -> None:
        """Writes every session: encoded here, written by a worker thread, one write at a time (the last wins)."""
        data = msgspec.json.encode(sorted(self.sessions.values(), key=lambda s: s.created))
        async with self._write_lock:
            await trio.to_thread.run_sync(self._write, data)

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_private(self.path, data)
