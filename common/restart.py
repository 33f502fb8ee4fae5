"""When a lost process of ours is started again: exponential backoff with jitter, a bounded number of attempts in a
row. One policy for every process sageLLM restarts (pipeline workers, managed engines, API servers), applied by the one
supervision loop (`common.supervision`).

The delay before attempt n is `backoff_base_s * 2**(n-1)`, at most `backoff_cap_s`, less up to `jitter` of itself
drawn at random, so processes that died together do not all come back in the same instant. A process that stayed up
`stable_after_s` after its last start has its count reset: a crash once a day is not a crash loop. With
`auto_restart: false`, or after `max_restart_attempts` attempts in a row, it is given up (its requests already ended
with an error; routing stops choosing it)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

from sagellm.common.errors import FieldError, check_known
from sagellm.common.hints import conforms, describe


@dataclass(frozen=True)
class RestartPolicy:
    auto_restart: bool = True
    max_restart_attempts: int = 5  # in a row, before giving up
    backoff_base_s: float = 1.0  # the delay before the first attempt
    backoff_cap_s: float = 30.0  # no delay is longer
    jitter: float = 0.2  # fraction of each delay taken off at random (0: exact delays)
    stable_after_s: float = 60.0  # up this long after a start: the next loss counts from attempt 1 again

    def __post_init__(self) -> None:
        for name, hint in get_type_hints(type(self)).items():
            value = getattr(self, name)
            if not conforms(value, hint):
                raise FieldError(name, f"{name}: expected {describe(hint)}, got {value!r}")
        if self.max_restart_attempts < 0:
            raise FieldError("max_restart_attempts", "max_restart_attempts: expected 0 or more")
        if not 0 < self.backoff_base_s <= self.backoff_cap_s:
            raise FieldError("backoff_base_s", "backoff_base_s: expected 0 < backoff_base_s <= backoff_cap_s")
        if not 0 <= self.jitter < 1:
            raise FieldError("jitter", f"jitter: expected a fraction in [0, 1), got {self.jitter}")
        if self.stable_after_s < 0:
            raise FieldError("stable_after_s", "stable_after_s: expected 0 or more")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> RestartPolicy:
        """The policy a graph's `restart:` mapping (or a gateway's settings) writes; FieldError names a bad key."""
        settings = dict(settings or {})
        check_known(settings, [item.name for item in dataclasses.fields(cls)], "restart setting")
        return cls(**settings)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt `attempt` (1 for the first)."""
        full = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1))
        return full * (1 - self.jitter * (rng or random).random())


class Restarts:
    """The attempts in a row of one restarted thing under a policy."""

    def __init__(self, policy: RestartPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.attempts = 0  # since the count was last reset
        self.total = 0  # restarts over the whole run (what status pages show)
        self._started_at: float | None = None
        self._rng = rng

    def started(self, now: float) -> None:
        """The process is up and serving (ready) from `now`."""
        self._started_at = now

    def next_delay(self, now: float) -> float | None:
        """How long to wait before the next attempt, counting it; None when the policy gives up."""
        if self._started_at is not None and now - self._started_at >= self.policy.stable_after_s:
            self.attempts = 0
        self._started_at = None
        if not self.policy.auto_restart or self.attempts >= self.policy.max_restart_attempts:
            return None
        self.attempts += 1
        self.total += 1
        return self.policy.delay(self.attempts, self._rng)
