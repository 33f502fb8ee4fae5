"""The API keys a front end accepts (`--api-key` and the keys file's), by their SHA-256: the guard of the API routes.

The gateway's process and every API server hold one; the core sends the API servers its keys (`KnownKey`, digests:
no secret crosses the link) whenever they change, so a key the file drops stops working everywhere. A key is known
by its name and the models it may use (a request naming another is refused here, before its route could load that
model on demand); what else it may do (its limits, its class) only the core enforces
(`tenants.Tenants`), since every request passes through it from whichever API server."""

from __future__ import annotations

import fnmatch

import msgspec

from sagellm.gateway.http.app import HttpRequest
from sagellm.gateway.http.auth import key_digest, owner_of_digest, presented_key
from sagellm.gateway.http.errors import ApiError


class KnownKey(msgspec.Struct, frozen=True, kw_only=True):
    """A key as the front ends know it."""

    digest: str  # its SHA-256, hex
    name: str
    models: list[str] | None = None  # shell patterns of the models it may use; None: all

    def may_use(self, model: str) -> bool:
        return self.models is None or any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


class _Named(msgspec.Struct):
    model: str | None = None


def _named_model(body: bytes) -> str | None:
    """The model a JSON body names, if it is one that names one."""
    if not body.startswith(b"{"):
        return None
    try:
        return msgspec.json.decode(body, type=_Named).model
    except msgspec.DecodeError:  # (a ValidationError too): the route says what is wrong with it
        return None


def not_allowed(model: str) -> ApiError:
    """OpenAI's answer for a model a key cannot use: as if it were not there."""
    return ApiError(404, f"The model `{model}` does not exist or your key may not use it", param="model",
                    code="model_not_found")  # fmt: skip


def plain_keys(keys: list[str]) -> list[KnownKey]:
    """`--api-key` keys: named by their place, with every model."""
    return [KnownKey(digest=key_digest(key), name=f"api-key-{i + 1}") for i, key in enumerate(keys)]


class KeyRing:
    """The keys accepted now (`replace` swaps them all at once: a reloaded file)."""

    def __init__(self, keys: list[KnownKey], required: bool) -> None:
        """`required`: a key is needed even when none is known (a keys file that lists none refuses everyone, it
        does not open the server)."""
        self.required = required
        self.replace(keys)

    def replace(self, keys: list[KnownKey]) -> None:
        self.keys = keys
        self._by_digest = {key.digest: key for key in keys}
        self._by_owner = {owner_of_digest(key.digest): key for key in keys}

    def guard(self, request: HttpRequest) -> None:
        """The API routes' guard: a known key, else a 401. Looked up by the presented key's digest: how long the
        lookup takes tells nothing of any key."""
        if not self.required:
            return
        key = presented_key(request)
        if key is None:
            raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
        known = self._by_digest.get(key_digest(key))
        if known is None:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        if known.models is not None:
            model = _named_model(request.body)
            if model is not None and not known.may_use(model):  # before the route may load it on demand
                raise not_allowed(model)

    def of_owner(self, owner: str) -> KnownKey | None:
        """The key a request's `owner` (its digest's head) is, None for none or one no longer known."""
        return self._by_owner.get(owner) if owner else None

    def may_use(self, owner: str, model: str) -> bool:
        """Whether the owner's key may use `model` (a request without a key, on an open server, may)."""
        key = self.of_owner(owner)
        return key is None or key.may_use(model)
