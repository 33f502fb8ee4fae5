"""The keys' policies, enforced where every request passes: the serving core's door (`ServingCore.submit_all`),
which requests from the gateway's own routes, from every API server and from gateways joined to this head all
enter. So a key's limits hold however many front ends its requests come through.

A client request (of one prompt or several: n, a list of prompts) is checked whole, before admission's:
- its model must be one the key may use (else a 404, as OpenAI answers for a model a key cannot see);
- its max_tokens at most the key's (a larger or unset one lowered to it);
- its requests in flight, requests in the last minute and tokens in the last minute (prompt + completion, the
  prompt counted as it enters, the completion as it ends) within the key's, else a 429 with Retry-After and the
  limit in OpenAI's `x-ratelimit-*` headers;
- its priority class lowered to the key's (a request may ask for a lower class, not a higher one), its prefix cache
  salted with the key's salt.
Each key's use is counted (`usage`) for /metrics and `GET /v1/management/usage`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from sagellm.common.errors import FieldError
from sagellm.gateway.http.auth import owner_of_digest
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.keys.key_ring import KeyRing, KnownKey, not_allowed, plain_keys
from sagellm.gateway.keys.keys_file import KeyPolicy, read_keys_file
from sagellm.gateway.keys.minute_window import MinuteWindow
from sagellm.runtime.pipeline.messages import LimitReached, Request

log = structlog.get_logger("sagellm.gateway")


@dataclass
class KeyUse:
    """One key's state and counts (kept by name, so a reloaded file's key goes on where it was)."""

    requests: MinuteWindow = field(default_factory=MinuteWindow)
    tokens: MinuteWindow = field(default_factory=MinuteWindow)
    running: int = 0  # client requests in flight
    requests_total: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    refused_total: dict[str, int] = field(default_factory=dict)  # by the limit met


@dataclass
class _Entry:
    """A client request let in: its key, its prompts still running, what it charged at the door."""

    name: str
    open: int
    prompt_tokens: int = 0


class Tenants:
    """The core's keys: the ring its own routes' guard checks, each file key's policy, and every key's use."""

    def __init__(self, api_keys: list[str], keys_file: Path | None, clock: Callable[[], float] = time.monotonic):
        """`api_keys`: `--api-key`'s keys (no limits); `keys_file`: `--api-keys-file` (read now: a wrong one stops
        the start, raising FieldError)."""
        self.plain, self.keys_file, self.clock = list(api_keys), keys_file, clock
        self.ring = KeyRing([], required=bool(api_keys) or keys_file is not None)
        self.policies: dict[str, KeyPolicy] = {}  # by owner
        self.use: dict[str, KeyUse] = {}  # by key name
        self._entries: dict[str, _Entry] = {}  # request id -> its client request's entry
        self._file_seen: tuple[int, int] | None = None
        self._install(read_keys_file(keys_file) if keys_file is not None else [])

    # -- the keys ----------------------------------------------------------------------------------------------------
    def known_keys(self) -> list[KnownKey]:
        return self.ring.keys

    def name_of(self, owner: str) -> str | None:
        """The name of the key a request's `owner` is (None: no key, or one no longer known)."""
        key = self.ring.of_owner(owner)
        return key.name if key is not None else None

    def reload(self, force: bool = False) -> bool:
        """Reads the keys file again if it changed (its size or time) or `force`; a wrong file is logged and the keys
        stay as they were. Whether the keys changed."""
        if self.keys_file is None:
            return False
        try:
            stat = self.keys_file.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
            if seen == self._file_seen and not force:
                return False
            self._file_seen = seen
            policies = read_keys_file(self.keys_file)
        except (OSError, FieldError) as exc:
            log.error("api_keys_file_not_reloaded", path=str(self.keys_file), error=str(exc))
            return False
        self._install(policies)
        log.info("api_keys_reloaded", path=str(self.keys_file), keys=len(self.ring.keys))
        return True

    def _install(self, policies: list[KeyPolicy]) -> None:
        if self.keys_file is not None and self._file_seen is None:
            stat = self.keys_file.stat()
            self._file_seen = (stat.st_mtime_ns, stat.st_size)
        known = plain_keys(self.plain)
        known += [KnownKey(digest=p.digest, name=p.name, models=p.models) for p in policies]
        self.ring.replace(known)
        self.policies = {owner_of_digest(p.digest): p for p in policies}
        for key in known:
            self.use.setdefault(key.name, KeyUse())

    # -- requests ----------------------------------------------------------------------------------------------------
    def admit(self, requests: list[Request], model: str) -> None:
        """Checks a client request's prompts against their key's policy and counts it (`give_back` undoes this if
        the door refuses them after all; `entered` once it lets them in). `model`: the name the client used.
        Raises ApiError: 404 (a model the key may not use), 429 (a limit)."""
        first = requests[0]
        key = self.ring.of_owner(first.owner)
        if key is None:
            return
        if not key.may_use(model):
            raise not_allowed(model)
        policy = self.policies.get(first.owner)
        use = self.use[key.name]
        if policy is not None:
            for request in requests:
                _apply(policy, request)
            self._check_limits(policy, use, requests)
        now = self.clock()
        use.requests.add(now, 1)
        use.running += 1
        entry = _Entry(key.name, len(requests))
        for request in requests:
            self._entries[request.request_id] = entry

    def give_back(self, requests: list[Request]) -> None:
        """Undoes `admit` for a client request the door refused."""
        entry = self._entries.get(requests[0].request_id)
        if entry is None:
            return
        use = self.use[entry.name]
        use.requests.take_back(1)
        use.running -= 1
        for request in requests:
            self._entries.pop(request.request_id, None)

    def entered(self, requests: list[Request]) -> None:
        """The door let a client request in: its prompts' tokens (known now) count against its key's minute."""
        entry = self._entries.get(requests[0].request_id)
        if entry is None:
            return
        use = self.use[entry.name]
        entry.prompt_tokens = sum(r.num_prompt_tokens for r in requests)
        use.tokens.add(self.clock(), entry.prompt_tokens)
        use.requests_total += 1
        use.prompt_tokens_total += entry.prompt_tokens

    def ended(self, request_id: str, completion_tokens: int) -> None:
        """One prompt of a client request ended (or its client left): its completion's tokens count; the request
        is out of flight once its last prompt ended."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        use = self.use[entry.name]
        use.tokens.add(self.clock(), completion_tokens)
        use.completion_tokens_total += completion_tokens
        entry.open -= 1
        if entry.open == 0:
            use.running -= 1

    def _check_limits(self, policy: KeyPolicy, use: KeyUse, requests: list[Request]) -> None:
        now = self.clock()
        if policy.max_concurrent is not None and use.running >= policy.max_concurrent:
            self._refuse(policy, use, "concurrent", policy.max_concurrent, 0, 1.0,
                         f"{use.running} requests in flight of at most {policy.max_concurrent}")  # fmt: skip
        if policy.requests_per_minute is not None:
            limit, used = policy.requests_per_minute, use.requests.used(now)
            wait = use.requests.wait_s(now, limit, 1)
            if wait > 0:
                self._refuse(policy, use, "requests", limit, 0, wait,
                             f"requests per minute: Limit {limit}, Used {used}, Requested 1")  # fmt: skip
        if policy.tokens_per_minute is not None:
            limit, used = policy.tokens_per_minute, use.tokens.used(now)
            need = sum(r.num_prompt_tokens for r in requests)  # known when a route tokenized them; else 0 here
            if used >= limit or (need and used + need > limit):
                wait = use.tokens.wait_s(now, limit, max(need, 1))
                self._refuse(policy, use, "tokens", limit, max(0, limit - used), wait,
                             f"tokens per minute: Limit {limit}, Used {used}, Requested {need}")  # fmt: skip

    def _refuse(self, policy: KeyPolicy, use: KeyUse, kind: str, limit: int, remaining: int, wait_s: float,
                what: str) -> None:  # fmt: skip
        use.refused_total[kind] = use.refused_total.get(kind, 0) + 1
        message = f"Rate limit reached for key {policy.name!r} on {what}. Please try again in {wait_s:.1f}s."
        reached = LimitReached(kind=kind, limit=limit, remaining=remaining, reset_s=wait_s)
        raise ApiError(429, message, code="rate_limit_exceeded", retry_after_s=max(wait_s, 0.001), limit=reached)

    # -- what was used -----------------------------------------------------------------------------------------------
    def usage(self) -> dict[str, dict]:
        """Each key's use: totals since start, its last minute, in flight, refusals by limit; and its limits."""
        now, by_name = self.clock(), {p.name: p for p in self.policies.values()}
        report = {}
        for key in self.ring.keys:
            use, policy = self.use[key.name], by_name.get(key.name)
            limits = {f: getattr(policy, f) for f in _LIMITS if getattr(policy, f) is not None} if policy else {}
            report[key.name] = {
                "requests": use.requests_total, "prompt_tokens": use.prompt_tokens_total,
                "completion_tokens": use.completion_tokens_total, "running": use.running,
                "last_minute": {"requests": use.requests.used(now), "tokens": use.tokens.used(now)},
                "rate_limited": dict(use.refused_total), "limits": limits,
            }  # fmt: skip
        return report


_LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent", "max_tokens")


def _apply(policy: KeyPolicy, request: Request) -> None:
    """The key's class, salt and max_tokens on a request of it: a larger or unset max_tokens lowered to the key's
    (the reply's finish_reason `length` says where it was cut), as Ollama's num_predict bounds a generation."""
    if policy.priority_class is not None:
        request.priority = max(request.priority, policy.priority_class)
    if policy.cache_salt is not None:
        salt = policy.cache_salt
        request.cache_salt = f"{salt}\x1f{request.cache_salt}" if request.cache_salt else salt
    cap, sampling = policy.max_tokens, request.sampling
    if cap is not None and request.phase != "embed" and (sampling.max_tokens is None or sampling.max_tokens > cap):
        request.sampling = dataclasses.replace(sampling, max_tokens=cap, min_tokens=min(sampling.min_tokens, cap))
