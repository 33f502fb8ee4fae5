"""When to add or remove a serving instance: the autoscaler's decision, from the signals the policies already read.

Pure and driven by the clock it is given, so the gateway's autoscaler (`sagellm.gateway.control.autoscaler`, which
starts and drains engine processes) and a simulator decide alike from the same numbers. Up when requests wait (more per
ready instance than `up_waiting_per_instance`, in the policy queues and in the engines' own) or the SLO-violation rate
of the requests that finished since the last reading reaches `up_slo_violation_rate`; down when the instances are mostly
idle (running and waiting below `down_load` of their slots) and nothing violated, and have stayed so for `down_delay_s`
(Ray Serve's downscale delay: a lull between two waves, or the moment a new instance becomes ready after the burst that
asked for it, is not a reason to remove one). One instance at a time, within `[min_instances, max_instances]`, never
while one is still starting (it has taken no load yet, so the signals do not show it); up waits out `up_cooldown_s`
after any change (a new instance needs time before the signals mean anything), and the quiet that allows down counts
from the last change at the earliest, so removing an instance right after adding it cannot flap."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sagellm.common.errors import FieldError, InvalidInput, check_known


@dataclass(frozen=True)
class AutoscaleSettings:
    min_instances: int = 1
    max_instances: int = 2
    up_waiting_per_instance: float = 2.0
    up_slo_violation_rate: float = 0.1
    down_load: float = 0.25
    up_cooldown_s: float = 30.0
    down_delay_s: float = 120.0  # how long the load must stay low before an instance is removed
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
        for name in ("up_cooldown_s", "down_delay_s"):
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


def instance_bounds(text: str) -> dict[str, int]:
    """`MIN:MAX` as the command lines write it (`--autoscale 1:4`) -> min_instances and max_instances; InvalidInput
    for anything else (the settings' own checks then judge the numbers)."""
    low, colon, high = text.partition(":")
    if not colon or not low.isdigit() or not high.isdigit():
        raise InvalidInput(f"--autoscale: expected MIN:MAX instances (1:4), got {text!r}")
    return {"min_instances": int(low), "max_instances": int(high)}


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
        self.quiet_since: float | None = None  # when the load last went below `down_load` (None: it is not)

    def decide(self, signals: Signals, now: float) -> Decision:
        s = self.settings
        total = signals.ready + signals.starting
        if total < s.min_instances:
            return self._change(+1, f"{total} instance(s), below the minimum {s.min_instances}", now)
        if signals.starting:
            self.quiet_since = None
            return Decision(0, f"{signals.starting} instance(s) starting")
        waiting_each = signals.waiting / max(signals.ready, 1)
        violating = signals.slo_violation_rate >= s.up_slo_violation_rate
        if waiting_each > s.up_waiting_per_instance or violating:
            why = (f"SLO violation rate {signals.slo_violation_rate:.2f}" if violating
                   else f"{waiting_each:.1f} requests waiting per instance")  # fmt: skip
            self.quiet_since = None
            if total >= s.max_instances:
                return Decision(0, f"{why}, at the maximum of {s.max_instances}")
            if self._cooling(s.up_cooldown_s, now):
                return Decision(0, f"{why}, cooling down")
            return self._change(+1, why, now)
        load = (signals.running + signals.waiting) / max(signals.slots, 1)
        if load >= s.down_load or signals.slo_violation_rate:
            self.quiet_since = None
            return Decision(0, f"load {load:.2f}")
        if self.quiet_since is None:
            self.quiet_since = now
        if not signals.removable or total <= s.min_instances:
            return Decision(0, f"load {load:.2f}, nothing to remove")
        quiet_s = now - self.quiet_since  # a change restarts the count: see `_change`
        if quiet_s < s.down_delay_s:
            return Decision(0, f"load {load:.2f}, quiet for {quiet_s:.0f} of {s.down_delay_s:g} s")
        return self._change(-1, f"load {load:.2f}, below {s.down_load:g} for {quiet_s:.0f} s", now)

    def _cooling(self, cooldown_s: float, now: float) -> bool:
        return self.last_change is not None and now - self.last_change < cooldown_s

    def _change(self, delta: int, reason: str, now: float) -> Decision:
        self.last_change, self.quiet_since = now, None
        return Decision(delta, reason)
