"""What each process of a run is busy with during a long wait (loading a model, building kernels, downloading), so a
front end can say what start-up waits for instead of printing nothing for seconds.

Code that waits marks it, nested as it goes (`with stage("loading model.gguf"): ... with stage("reading weights")`);
this process's stages are kept as `HERE`, and a worker's (sent in its heartbeats) are `report`ed under its name. A
listener (the CLI's display) is told of every change; nothing is shown unless a front end listens. The library stays
quiet: this module prints nothing itself."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

HERE = "main"  # this process's name among the run's (the worker groups are named by their groups)

_lock = threading.Lock()  # stages change in worker threads (a model loads off the event loop)
_stack: list[tuple[str, float]] = []  # this process's stages, outermost first: (what, since on time.monotonic)
_others: dict[str, tuple[str, float]] = {}  # another process's innermost stage
_listeners: list[Callable[[], None]] = []


@contextmanager
def stage(what: str) -> Iterator[None]:
    """Marks this process as busy with `what` while the block runs."""
    entry = (what, time.monotonic())
    with _lock:
        _stack.append(entry)
    _changed()
    try:
        yield
    finally:
        with _lock:
            _stack.remove(entry)
        _changed()


def current() -> tuple[str, float] | None:
    """This process's stage as (what, seconds in it): the innermost one, with its outer ones before it."""
    with _lock:
        if not _stack:
            return None
        return " · ".join(what for what, _ in _stack), time.monotonic() - _stack[-1][1]


def report(who: str, what: str | None, elapsed_s: float = 0.0) -> None:
    """Another process's stage (a worker's, from its heartbeat); None: it is not waiting on anything."""
    with _lock:
        before = _others.get(who)
        if what is None:
            _others.pop(who, None)
        elif before is None or before[0] != what:
            _others[who] = (what, time.monotonic() - elapsed_s)
        changed = _others.get(who) != before
    if changed:
        _changed()


def snapshot() -> dict[str, tuple[str, float]]:
    """Every process that is waiting on something: name -> (what, seconds in it)."""
    now = time.monotonic()
    with _lock:
        others = {who: (what, now - since) for who, (what, since) in _others.items()}
    here = current()
    return {HERE: here, **others} if here else others


@contextmanager
def listening(listener: Callable[[], None]) -> Iterator[None]:
    """Calls `listener()` (from whatever thread changed it) on every change while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
        with _lock:
            _others.clear()


def shown() -> bool:
    """Whether a front end shows the stages: then code that waits draws no bar of its own (its stage says it)."""
    return bool(_listeners)


def _changed() -> None:
    for listener in list(_listeners):
        listener()
