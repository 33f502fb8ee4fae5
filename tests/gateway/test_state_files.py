"""The files a gateway keeps in its state directory: private to their owner, and a damaged one never stops a start."""

from __future__ import annotations

import stat
from pathlib import Path

from structlog.testing import capture_logs

from sagellm.gateway.auth import ADMIN_KEY_FILE, admin_key, read_admin_key
from sagellm.gateway.sessions import SESSIONS_FILE, SessionStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_admin_key_file_is_private_even_when_it_was_not(tmp_path: Path) -> None:
    loose = tmp_path / ADMIN_KEY_FILE
    loose.write_text("old\n")
    loose.chmod(0o644)
    key = admin_key(tmp_path, None)
    assert read_admin_key(tmp_path) == key != "old" and mode(loose) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [ADMIN_KEY_FILE]  # no temporary file left behind


def test_sessions_are_kept_privately_and_survive_a_reload(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session = store.create("t", [{"role": "user", "content": "hi"}])
    assert mode(tmp_path / SESSIONS_FILE) == 0o600
    assert SessionStore(tmp_path).get(session.id).messages == [{"role": "user", "content": "hi"}]


def test_a_damaged_sessions_file_is_moved_aside_named_and_the_store_starts_empty(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    store.create("t")
    path = tmp_path / SESSIONS_FILE
    path.write_bytes(path.read_bytes()[:7])  # truncated, as a full disk leaves it
    with capture_logs() as logs:
        reopened = SessionStore(tmp_path)
    assert reopened.sessions == {} and not path.exists()
    (kept,) = tmp_path.glob(f"{SESSIONS_FILE}.bad-*")
    (warning,) = [e for e in logs if e["event"] == "sessions_file_unreadable"]
    assert warning["path"] == str(path) and warning["moved_to"] == str(kept)
    reopened.create("fresh")  # and it writes again
    assert len(SessionStore(tmp_path).sessions) == 1
