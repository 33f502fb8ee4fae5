"""The API keys file (`--api-keys-file`): each key with a name and what it may do, as a team sharing one server gives
its members, and as LiteLLM's proxy and SGLang's gateway give their keys.

    keys:
      - name: team-a
        key: sk-team-a              # or key_sha256: the key's SHA-256 in hex, so the file holds no secret
        requests_per_minute: 60     # at most this many requests in any 60 s
        tokens_per_minute: 100000   # prompt + completion tokens in any 60 s
        max_concurrent: 8           # requests in flight at once
        max_tokens: 2048            # a request's completion at most: a larger or unset max_tokens is lowered to it
        priority: low               # the highest class its requests run at (critical, high, normal, low or a number)
        models: [smollm2, "embed-*"]  # the models it may use (shell patterns); unset: all
        cache_salt: team-a          # its prefix cache is its own: no other key's request reuses its blocks

YAML (or JSON, which YAML reads). A wrong file is refused whole with the field it got wrong; the gateway reads it
again when it changes and on SIGHUP (`reload.keep_keys_current`), keeping the keys it had while a new one is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from sagellm.common.errors import FieldError
from sagellm.gateway.http.auth import key_digest
from sagellm.runtime.engine.priority_classes import PRIORITY_CLASSES

Positive = Annotated[int, msgspec.Meta(ge=1)]


class KeyPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One key of the file: who it is and what it may do (None: no bound)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")]
    key: Annotated[str, msgspec.Meta(min_length=8)] | None = None
    key_sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")] | None = None
    requests_per_minute: Positive | None = None
    tokens_per_minute: Positive | None = None
    max_concurrent: Positive | None = None
    max_tokens: Positive | None = None
    priority: str | int | None = None
    models: list[str] | None = None
    cache_salt: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None

    @property
    def digest(self) -> str:
        """The key's SHA-256 in hex: what the front ends compare a presented key's with."""
        return self.key_sha256 or key_digest(self.key or "")

    @property
    def priority_class(self) -> int | None:
        return PRIORITY_CLASSES[self.priority] if isinstance(self.priority, str) else self.priority


class KeysFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    keys: list[KeyPolicy]


def read_keys_file(path: Path) -> list[KeyPolicy]:
    """The file's keys. Raises FieldError (`api_keys_file`) naming the file and what is wrong in it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FieldError("api_keys_file", f"--api-keys-file {path}: {exc.strerror or exc}") from None
    try:
        keys = msgspec.yaml.decode(data, type=KeysFile).keys
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise FieldError("api_keys_file", f"--api-keys-file {path}: {exc}") from None
    problem = _problem(keys)
    if problem is not None:
        raise FieldError("api_keys_file", f"--api-keys-file {path}: {problem}")
    return keys


def _problem(keys: list[KeyPolicy]) -> str | None:
    names: set[str] = set()
    digests: set[str] = set()
    for i, policy in enumerate(keys):
        where = f"keys[{i}] ({policy.name})"
        if (policy.key is None) == (policy.key_sha256 is None):
            return f"{where}: give one of key or key_sha256"
        if isinstance(policy.priority, str) and policy.priority not in PRIORITY_CLASSES:
            classes = ", ".join(PRIORITY_CLASSES)
            return f"{where}: priority must be one of {classes} or a number, got {policy.priority!r}"
        if policy.name in names:
            return f"{where}: the name is another key's too"
        if policy.digest in digests:
            return f"{where}: the key is another key's too"
        names.add(policy.name)
        digests.add(policy.digest)
    return None
