"""API keys: `Authorization: Bearer KEY` (or `X-API-Key`) checked in constant time.

Two kinds: API keys for `/v1` (none configured: open, as vLLM is by default on 127.0.0.1) and the admin key for the
management and admin routes, which are never open: without a configured admin key the gateway makes one at start
and writes it, readable by its owner only, into its state directory, where the CLI on the same machine finds it."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from sagellm.common.private_files import write_private
from sagellm.gateway.http.app import Guard, HttpRequest
from sagellm.gateway.http.errors import ApiError

ADMIN_KEY_FILE = "admin.key"


def presented_key(request: HttpRequest) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def key_owner(request: HttpRequest) -> str:
    """Who sent a request, as the state the gateway keeps records it (sessions, request status); the gateway's own
    request (a batch's line) runs for the owner it names."""
    return request.owner if request.owner is not None else owner_of(presented_key(request))


OWNER_CHARS = 24  # an owner is a key's digest's first 24 hex digits


def owner_of(key: str | None) -> str:
    """The owner recorded for a presented API key: a digest, so nothing kept holds a key; "" for none."""
    return owner_of_digest(key_digest(key)) if key else ""


def owner_of_digest(digest: str) -> str:
    """The owner of the key whose SHA-256 is `digest` (a keys file may give a key by its digest alone)."""
    return digest[:OWNER_CHARS]


def key_digest(key: str) -> str:
    """A key's SHA-256 in hex: what the API routes compare a presented key by, and its owner's source."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_guard(keys: list[str], what: str) -> Guard | None:
    """A guard accepting any of `keys`; None (no check) when there are none."""
    if not keys:
        return None
    encoded = [k.encode() for k in keys]

    def guard(request: HttpRequest) -> None:
        key = presented_key(request)
        if key is None:
            raise ApiError(401, f"missing {what} key: send `Authorization: Bearer <key>`", code="invalid_api_key")
        if not any(hmac.compare_digest(key.encode(), k) for k in encoded):
            raise ApiError(401, f"invalid {what} key", code="invalid_api_key")

    return guard


def new_key() -> str:
    """A fresh secret key (192 bits). Hex, because a key is pasted after a flag (`--join-key KEY`) and a url-safe
    token starts with "-" one time in 64, which argparse takes for an option."""
    return secrets.token_hex(24)


def admin_key(state_dir: Path, configured: str | None) -> str:
    """The configured admin key, else a fresh one written to `state_dir/admin.key` (mode 0600)."""
    if configured:
        return configured
    state_dir.mkdir(parents=True, exist_ok=True)
    key = new_key()
    write_private(state_dir / ADMIN_KEY_FILE, (key + "\n").encode())
    return key


def read_admin_key(state_dir: Path) -> str | None:
    path = state_dir / ADMIN_KEY_FILE
    return path.read_text().strip() if path.exists() else None
