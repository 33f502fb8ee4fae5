"""What `sagellm bench steps` measures with, beside the engine's own step timer (`runtime.engine.step_trace`): the
load the rest of the machine put on the cores while it timed, and the pooling of like steps into one sample each."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sagellm.runtime.engine.step_trace import TimedStep
from sagellm.simulator.step_model import StepSample

BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # of /proc/stat's cpu line: user, nice, system, irq, softirq, steal (not idle, iowait)


class OtherLoad:
    """The cores the rest of the machine kept busy (other processes, the kernel, the hypervisor's steal) since it was
    made: on a shared 2-core machine another process's burst slows a step several-fold (torch's threads wait on the
    one that lost its core), so a measurement taken meanwhile is retried rather than believed. Reads /proc (Linux;
    elsewhere it reads 0). Ticks are 10 ms: judge windows of a few hundred ms. With `children`, this process's worker
    processes count as its own once they ended and were waited for: read `cores()` after the run that used them;
    `pids` (worker processes still running) count as its own meanwhile."""

    def __init__(self, *, children: bool = False, pids: Sequence[int] = ()) -> None:
        self.children, self.pids = children, tuple(pids)
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        from sagellm.benchmarks.proc_stats import cpu_seconds

        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return 0.0, 0.0, time.perf_counter()
        busy = sum(int(fields[i]) for i in BUSY_FIELDS if i < len(fields)) / os.sysconf("SC_CLK_TCK")
        return busy, cpu_seconds(os.getpid(), *self.pids, children=self.children), time.perf_counter()

    def cores(self) -> float:
        """Busy cores of everything but this process, on average since it was made."""
        busy, own, now = self._read()
        busy0, own0, then = self._start
        return max(0.0, (busy - busy0) - (own - own0)) / (now - then) if now > then else 0.0


def sample_of(step: TimedStep, seconds: float | None = None, neighbour_busy: float = 0.0) -> StepSample:
    """A timed step as the step model's sample: its own time, or `seconds` (a served step's whole cycle), and the
    fraction of that time another engine on the machine computed (`busy_fraction`)."""
    return StepSample(
        step.prefill_tokens,
        step.decode_seqs,
        step.context_tokens,
        step.seconds if seconds is None else seconds,
        prefill_context=step.prefill_context,
        neighbour_busy=neighbour_busy,
    )


def busy_fraction(start: float, end: float, others: Sequence[TimedStep], starts: np.ndarray) -> float:
    """The fraction of [start, end] during which another engine was computing: `others` are its steps (one at a
    time, in order), `starts` their start times."""
    i = max(0, int(np.searchsorted(starts, start)) - 1)
    busy = 0.0
    while i < len(others) and others[i].started < end:
        other = others[i]
        if other.ended > start:
            busy += min(other.ended, end) - max(other.started, start)
        i += 1
    return min(1.0, busy / (end - start)) if end > start else 0.0


def median_sample(samples: list[StepSample]) -> StepSample:
    """Each field's median: one composition timed several times (a decode's context grows a token per step)."""
    return StepSample(
        int(np.median([s.prefill_tokens for s in samples])),
        int(np.median([s.decode_seqs for s in samples])),
        int(np.median([s.context_tokens for s in samples])),
        float(np.median([s.seconds for s in samples])),
        prefill_context=int(np.median([s.prefill_context for s in samples])),
        neighbour_busy=float(np.mean([s.neighbour_busy for s in samples])),
    )


def pooled_sample(samples: list[StepSample]) -> StepSample:
    """Served steps of like composition as one: the median composition, the mean time (and the mean time a
    neighbour computed beside them, which the mean time is linear in). The mean, because what the simulator adds up
    (a TTFT, a TPOT) is a sum of steps, whose expectation is the sum of their means: a median leaves out the slow
    tail that serving pays (a step that waited for a core), and a model fitted to medians comes out faster than the
    runs it simulates."""
    median = median_sample(samples)
    return dataclasses.replace(median, seconds=float(np.mean([s.seconds for s in samples])))


def kind_of(sample: StepSample) -> str:
    if not sample.prefill_tokens:
        return "decode"
    if sample.decode_seqs:
        return "mixed"
    return "chunked" if sample.prefill_context else "prefill"


def octave_bin(value: int) -> int:
    return round(4 * math.log2(value)) if value > 0 else -1  # quarter octaves: bins ~19% wide


def pool(samples: list[StepSample]) -> tuple[list[StepSample], list[int]]:
    """Steps of like composition (same decode batch size; prompt tokens, decode context and chunks' earlier context
    in the same quarter octave) pooled into one (`pooled_sample`), so every composition weighs alike in the fit,
    however often serving ran it; -> (samples, the steps pooled into each)."""
    bins: dict[tuple[int, ...], list[StepSample]] = {}
    for s in samples:
        key = (s.decode_seqs, octave_bin(s.prefill_tokens), octave_bin(s.context_tokens))
        bins.setdefault(key + (octave_bin(s.prefill_context),), []).append(s)
    pooled = sorted(bins.items())
    return [pooled_sample(steps) for _, steps in pooled], [len(steps) for _, steps in pooled]
