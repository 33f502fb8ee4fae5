"""Torch's threads fitted, between steps, to the cores that other programs leave this process.

Every parallel region of a step waits for its slowest thread. A thread sharing its core with a busy program loses the
core for a scheduler time slice at a time, and the step waits with it: on 2 cores with one `yes > /dev/null` beside
the engine, SmolLM2 decoded ~10x slower with two threads than quiet, and ~1.5x slower with one. llama.cpp and
vLLM-CPU keep the count they started with and slow down 3-4x. So the engine samples, every quarter second between
steps, how many cores' worth others use on its cores (common/core_load.py, smoothed), and runs as many threads as
leave each one a core of its own: fewer as soon as others take half a core of what the threads need, more again once
they leave nearly a whole core spare (the gap keeps a steady load from flipping the count). The ceiling is the count
the engine was given (its cores, cgroup quota or `num_threads`): the governor never runs more.

One governor a process, like torch's thread count it sets; the model runner asks it before each step
(`fit_threads`), which costs a clock read unless a quarter second has passed.

A kernel that splits a sum among its threads (attention over a long context) adds in another order with another
count, so the last bits of a step's logits follow the count, as they follow a batch's make-up. Runs that compare
outputs bit for bit across runs (the test suite) set SAGELLM_FIXED_THREADS=1: no governor in any process then."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import structlog
import torch

from sagellm.common.core_load import CoreLoad

log = structlog.get_logger("sagellm.engine")

INTERVAL_S = 0.25  # between samples: a few steps, and quick enough to follow a program starting or stopping
SMOOTHING = 0.5  # the newest sample's weight: a load is believed after about two samples
LOWER_BELOW = 0.5  # n threads while others leave more than n - 0.5 cores free
RAISE_FROM = 0.7  # n + 1 threads once others leave n + 0.7 cores free
FIXED_ENV = "SAGELLM_FIXED_THREADS"  # "1": every engine keeps its ceiling, whatever its adaptive_threads says


class ThreadGovernor:
    """Sets torch's threads to what the cores others leave will run well, at most `ceiling`."""

    def __init__(self, ceiling: int, cores: int, load: CoreLoad, clock: Callable[[], float] = time.monotonic) -> None:
        self.ceiling = self.threads = ceiling
        self._cores = cores
        self._load, self._clock = load, clock
        self._others = 0.0
        self._next = clock() + INTERVAL_S

    def fit(self) -> int:
        """The threads for the next step: the count of the last sample, or a new one each quarter second."""
        now = self._clock()
        if now < self._next:
            return self.threads
        self._next = now + INTERVAL_S
        self._others = SMOOTHING * self._load.sample() + (1 - SMOOTHING) * self._others
        threads = self.fitting(self._cores - self._others)
        if threads != self.threads:
            log.info("threads_fitted", threads=threads, was=self.threads, others_cores=round(self._others, 2))
            self.threads = threads
            torch.set_num_threads(threads)
        return threads

    def fitting(self, free: float) -> int:
        """The count for `free` cores (the cores less what others use), from the current one: lower when a thread
        would lack half a core, higher when one more would have nearly a whole one."""
        threads = self.threads
        if free < threads - LOWER_BELOW:
            threads = math.floor(free + LOWER_BELOW)
        elif free >= threads + RAISE_FROM:
            threads = math.floor(free + 1 - RAISE_FROM)
        return max(1, min(self.ceiling, threads))


_governor: ThreadGovernor | None = None


def govern_threads(ceiling: int, cores: list[int]) -> ThreadGovernor | None:
    """Installs this process's governor over `ceiling` threads on `cores` (None where the kernel does not say what
    others use: the threads then stay at the ceiling)."""
    global _governor
    load = None if ceiling < 2 or os.environ.get(FIXED_ENV) == "1" else CoreLoad.of(cores)
    _governor = None if load is None else ThreadGovernor(ceiling, len(cores), load)
    return _governor


def stop_governing() -> None:
    """Threads stay where they are set: a count the user fixed, or an accelerator's process."""
    global _governor
    _governor = None


def fit_threads() -> None:
    """Before a step: this process's threads fitted to the cores others leave, when a governor is installed."""
    if _governor is not None:
        _governor.fit()
