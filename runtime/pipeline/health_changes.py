"""The wake-up for "an engine instance's health changed": whoever waits for an instance to become ready (a request
retried while its engine restarts, `InstanceRegistry.instance_ready`) waits on it instead of polling.

Health is written by many hands (heartbeats, a worker's supervision, a managed engine's state, HTTP probes of the
servers we reach), all through `InstanceStats`' fields, so `InstanceStats` fires this as any of them changes and no
writer has to remember to. One signal per trio run (a `RunVar`), not per instance: a waiter looks at a set of
instances that may grow, and a wake it did not need costs one look."""

from __future__ import annotations

from trio.lowlevel import RunVar

from sagellm.common.pulse import Pulse

_CHANGED: RunVar[Pulse] = RunVar("instance_health_changed")


def health_changed() -> None:
    """Wakes the waiters of `next_health_change`. Outside trio (a simulator, a worker thread) there is no waiter to
    wake: health is written on the event loop, where heartbeats, supervision and probes run."""
    try:
        pulse = _CHANGED.get()
    except (LookupError, RuntimeError):  # nobody waited yet in this run; not in a trio run
        return
    pulse.fire()


async def next_health_change() -> None:
    """Returns at the next change of any instance's health (or its registration): re-check, then wait again."""
    try:
        pulse = _CHANGED.get()
    except LookupError:
        pulse = Pulse()
        _CHANGED.set(pulse)
    await pulse.wait()
