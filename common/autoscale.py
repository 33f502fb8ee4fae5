"""When to add or remove a serving instance: the autoscaler's decision, from the signals the policies already read.

Pure and driven by the clock it is given, so the gateway's autoscaler (`sagellm.gateway.autoscaler`, which starts and
drains engine processes) and a simulator decide alike from the same numbers. Up when requests wait (more per ready
instance than `up_waiting_per_instance`, in the policy queues and in the engines' own) or the SLO-violation rate of
the requests that finished since the last reading reaches `up_slo_violation_rate`; down when the instances are mostly
idle (running and waiting below `down_load` of their slots) and nothing violated. One instance at a time, within
`[min_instances, max_instances]`, never while one is still starting (it has taken no load yet, so the signals do not
show it), and each direction waits out its cool-down after any change: a new instance needs time before the signals
mean anything, and removing one right after adding it would flap."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sagellm.common.errors import FieldError, check_known


@dataclass(frozen=True)
class AutoscaleSettings:
    min_instances: int = 1
    max_instances: int = 2
    up_waiting_per_instance: float = 2.0
    up_slo_violation_rate: float = 0.1
    down_load: float = 0.25
    up_cooldown_s: float = 30.0
    down_cooldown_s: float = 120.0
    interval_s: float = 2.0  # how often the signals are read

    def __post_init__(self) -> None:
        if not 1 <= self.min_instances <= self.max_instances:
            raise FieldError("max_instances", "need 1 <= min_instances <= max_instances, got "
                                              f"{self.min_instances} and {self.max_instances}")  # fmt: skip
        if self.up_waiting_per_instance <= 0:
            raise FieldError("up_waiting_per_instance", "up_waiting_per_instance must be > 0")
        if not 0 < self.up_slo_violation_rate <= 1:
            raise FieldError("up_slo_violation_rate", "up_slo_violation_rate must be in (0, 1]")
        if not 0 <= self.down_load < 1:
            raise FieldError("down_load", "down_load must be in [0, 1)")
        for name in ("up_cooldown_s", "down_cooldown_s"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"{name} must be >= 0")
        if self.interval_s <= 0:
            raise FieldError("interval_s", "interval_s must be > 0")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> AutoscaleSettings:
        """The settings a graph's `autoscale:` mapping writes; FieldError names a bad or unknown key."""
        settings = dict(settings or {})
        check_known(settings, [item.name for item in dataclasses.fields(cls)], "autoscale setting")
        for key, value in settings.items():
            whole = key in ("min_instances", "max_instances")
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
                raise FieldError(str(key), f"{key} must be {'a whole number' if whole else 'a number'}, got {value!r}")
        return cls(**settings)


@dataclass(frozen=True)
class Signals:
    """One reading of the instances serving a model."""

    ready: int  # healthy instances taking requests
    starting: int  # instances added and not yet healthy
    removable: int  # of the ready ones, those the autoscaler added (only they are ever removed)
    waiting: int  # requests in the policy queues and in the engines' own queues
    running: int  # requests the ready instances run
    slots: int  # requests the ready instances can run at once
    slo_violation_rate: float  # of the requests that finished since the last reading and had an SLO


@dataclass(frozen=True)
class Decision:
    delta: int  # +1 add an instance, -1 remove one, 0 keep them
    reason: str


class Autoscale:
    """The decisions of one autoscaler: its settings and when it last changed the instances."""

    def __init__(self, settings: AutoscaleSettings) -> None:
        self.settings = settings
        self.last_change: float | None = None

    def decide(self, signals: Signals, now: float) -> Decision:
        s = self.settings
        total = signals.ready + signals.starting
        if total < s.min_instances:
            return self._change(+1, f"{total} instance(s), below the minimum {s.min_instances}", now)
        if signals.starting:
            return Decision(0, f"{signals.starting} instance(s) starting")
        waiting_each = signals.waiting / max(signals.ready, 1)
        violating = signals.slo_violation_rate >= s.up_slo_violation_rate
        if waiting_each > s.up_waiting_per_instance or violating:
            why = (f"SLO violation rate {signals.slo_violation_rate:.2f}" if violating
                   else f"{waiting_each:.1f} requests waiting per instance")  # fmt: skip
            if total >= s.max_instances:
                return Decision(0, f"{why}, at the maximum of {s.max_instances}")
            if self._cooling(s.up_cooldown_s, now):
                return Decision(0, f"{why}, cooling down")
            return self._change(+1, why, now)
        load = (signals.running + signals.waiting) / max(signals.slots, 1)
        if load < s.down_load and not signals.slo_violation_rate and signals.removable and total > s.min_instances:
            if self._cooling(s.down_cooldown_s, now):
                return Decision(0, f"load {load:.2f}, cooling down")
            return self._change(-1, f"load {load:.2f}, below {s.down_load:g}", now)
        return Decision(0, f"load {load:.2f}")

    def _cooling(self, cooldown_s: float, now: float) -> bool:
        return self.last_change is not None and now - self.last_change < cooldown_s

    def _change(self, delta: int, reason: str, now: float) -> Decision:
        self.last_change = now
        return Decision(delta, reason)
