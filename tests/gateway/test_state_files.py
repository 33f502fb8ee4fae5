"""The files a gateway keeps in its state directory: private to their owner, and a damaged one never stops a start."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sagellm.cli.main import build_parser
from sagellm.gateway.http.auth import ADMIN_KEY_FILE, admin_key, owner_of, read_admin_key
from sagellm.gateway.openai.chat_completion.protocol import ChatMessage
from sagellm.gateway.sessions.routes import _without_oldest
from sagellm.gateway.sessions.store import (
    MAX_SESSION_BYTES,
    MAX_SESSIONS,
    SESSIONS_FILE,
    SessionLimitError,
    SessionStore,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_admin_key_file_is_private_even_when_it_was_not(tmp_path: Path) -> None:
    loose = tmp_path / ADMIN_KEY_FILE
    loose.write_text("old\n")
    loose.chmod(0o644)
    key = admin_key(tmp_path, None)
    assert read_admin_key(tmp_path) == key != "old" and mode(loose) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [ADMIN_KEY_FILE]  # no temporary file left behind


def test_generated_keys_pass_as_a_flags_value(tmp_path: Path) -> None:
    """`sagellm serve --join-key KEY` takes the head's generated admin key as typed; a key starting with "-" would be
    read as an option (a url-safe token does one time in 64)."""
    parser = build_parser(["serve"])
    keys = [admin_key(tmp_path / str(i), None) for i in range(200)]
    assert len(set(keys)) == 200
    assert all(parser.parse_args(["serve", "--join-key", key]).join_key == key for key in keys)


async def test_sessions_are_kept_privately_per_key_and_survive_a_reload(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    alice, bob = owner_of("sk-alice"), owner_of("sk-bob")
    session = store.create(alice, "t", [{"role": "user", "content": "hi"}])
    await store.save()
    assert mode(tmp_path / SESSIONS_FILE) == 0o600 and b"sk-alice" not in (tmp_path / SESSIONS_FILE).read_bytes()
    reloaded = SessionStore(tmp_path)
    assert reloaded.get(session.id, alice).messages == [{"role": "user", "content": "hi"}]
    assert reloaded.get(session.id, bob) is None and reloaded.owned_by(bob) == []


def test_a_key_keeps_a_bounded_number_of_sessions_of_bounded_size(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    sessions = [store.create("k") for _ in range(MAX_SESSIONS)]
    with pytest.raises(SessionLimitError, match=f"already has {MAX_SESSIONS} sessions"):
        store.create("k")
    store.create("another key")  # the limit is per key
    big = {"role": "user", "content": "x" * (MAX_SESSION_BYTES // 2)}
    store.append(sessions[0], big)
    with pytest.raises(SessionLimitError, match="over its limit"):
        store.append(sessions[0], big, big)
    assert len(sessions[0].messages) == 1  # nothing of a refused append is kept


async def test_a_damaged_sessions_file_is_moved_aside_named_and_the_store_starts_empty(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    store.create("")
    await store.save()
    path = tmp_path / SESSIONS_FILE
    path.write_bytes(path.read_bytes()[:7])  # truncated, as a full disk leaves it
    with capture_logs() as logs:
        reopened = SessionStore(tmp_path)
    assert reopened.sessions == {} and not path.exists()
    (kept,) = tmp_path.glob(f"{SESSIONS_FILE}.bad-*")
    (warning,) = [e for e in logs if e["event"] == "sessions_file_unreadable"]
    assert warning["path"] == str(path) and warning["moved_to"] == str(kept)
    reopened.create("")  # and it writes again
    await reopened.save()
    assert len(SessionStore(tmp_path).sessions) == 1


def test_a_long_history_drops_its_oldest_turns_but_never_the_system_message_or_the_new_turn() -> None:
    history = [ChatMessage(role="system", content="be brief")] + [
        ChatMessage(role="user" if i % 2 == 0 else "assistant", content=str(i)) for i in range(6)
    ]
    assert [m.content for m in _without_oldest(history, 1, keep=1)] == ["be brief", "1", "2", "3", "4", "5"]
    assert [m.content for m in _without_oldest(history, 4, keep=1)] == ["be brief", "4", "5"]
    assert [m.content for m in _without_oldest(history, 99, keep=1)] == ["be brief", "5"]
    assert _without_oldest(history[:1] + history[-1:], 1, keep=1) is None  # only the system message and the turn
