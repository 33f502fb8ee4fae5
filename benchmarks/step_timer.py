"""What `sagellm bench steps` measures with: a step timer on an engine (the composition of each step read from the
scheduler's own batch, its wall time around `engine.step()`), the load the rest of the machine put on the cores while
it timed, and the pooling of like steps into one sample each."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.engine.scheduler import ScheduledBatch
from sagellm.simulator.step_model import StepSample

BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # of /proc/stat's cpu line: user, nice, system, irq, softirq, steal (not idle, iowait)


class OtherLoad:
    """The cores the rest of the machine kept busy (other processes, the kernel, the hypervisor's steal) since it was
    made: on a shared 2-core machine another process's burst slows a step several-fold (torch's threads wait on the
    one that lost its core), so a measurement taken meanwhile is retried rather than believed. Reads /proc (Linux;
    elsewhere it reads 0). Ticks are 10 ms: judge windows of a few hundred ms. With `children`, this process's worker
    processes count as its own once they ended and were waited for: read `cores()` after the run that used them."""

    def __init__(self, *, children: bool = False) -> None:
        self.children = children
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        from sagellm.benchmarks.proc_stats import cpu_seconds

        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return 0.0, 0.0, time.perf_counter()
        busy = sum(int(fields[i]) for i in BUSY_FIELDS if i < len(fields)) / os.sysconf("SC_CLK_TCK")
        return busy, cpu_seconds(os.getpid(), children=self.children), time.perf_counter()

    def cores(self) -> float:
        """Busy cores of everything but this process, on average since it was made."""
        busy, own, now = self._read()
        busy0, own0, then = self._start
        return max(0.0, (busy - busy0) - (own - own0)) / (now - then) if now > then else 0.0


@dataclass(frozen=True)
class TimedStep:
    """One engine step as `StepTimer` saw it: perf_counter start and end, whether the engine still had work after
    it (then the next step follows at once, and the time between is the executor's turn, part of serving)."""

    started: float
    ended: float
    sample: StepSample
    busy_after: bool


class StepTimer:
    """Times every `engine.step()` and reads what the step computed from the batch the scheduler returned: prompt
    tokens of the chunks, decode sequences, the KV the decodes attend over (as the model runner counts them) and the
    earlier prompt tokens the chunks attend over. With `log` set, every step that computed something is appended."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._schedule, self._step = engine.scheduler.schedule, engine.step
        engine.scheduler.schedule = self._recording_schedule  # the one door every step goes through
        engine.step = self._timed_step  # whoever steps the engine (this class, an engine operator)
        self._composition: tuple[int, int, int, int] = (0, 0, 0, 0)
        self.last = StepSample(0, 0, 0, 0.0)
        self.log: list[TimedStep] | None = None

    def _recording_schedule(self) -> ScheduledBatch:
        batch = self._schedule()
        decodes = batch.num_decodes  # single-token entries come first
        context = sum(seq.num_computed_tokens + 1 for seq in batch.seqs[:decodes])
        # At schedule time a chunk's sequence has num_computed_tokens of its prompt in the KV cache (computed or
        # cached): the earlier tokens each of the chunk's tokens attends over.
        chunks = list(zip(batch.seqs[decodes:], batch.num_new_tokens[decodes:]))
        earlier = sum(n * seq.num_computed_tokens for seq, n in chunks)
        self._composition = (sum(n for _, n in chunks), decodes, context, earlier)
        return batch

    def _timed_step(self) -> Any:
        started = time.perf_counter()
        outputs = self._step()
        ended = time.perf_counter()
        prefill, decodes, context, earlier = self._composition
        self._composition = (0, 0, 0, 0)
        self.last = StepSample(prefill, decodes, context, ended - started, prefill_context=earlier)
        if self.log is not None and (prefill or decodes):
            self.log.append(TimedStep(started, ended, self.last, self.engine.has_unfinished_requests()))
        return outputs

    def step(self) -> StepSample:
        self.engine.step()
        return self.last


def median_sample(samples: list[StepSample]) -> StepSample:
    """Each field's median: one composition timed several times (a decode's context grows a token per step)."""
    return StepSample(
        int(np.median([s.prefill_tokens for s in samples])),
        int(np.median([s.decode_seqs for s in samples])),
        int(np.median([s.context_tokens for s in samples])),
        float(np.median([s.seconds for s in samples])),
        prefill_context=int(np.median([s.prefill_context for s in samples])),
    )


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
    in the same quarter octave) pooled into their median, so every composition weighs alike in the fit, however
    often serving ran it; -> (samples, the steps pooled into each)."""
    bins: dict[tuple[int, ...], list[StepSample]] = {}
    for s in samples:
        key = (s.decode_seqs, octave_bin(s.prefill_tokens), octave_bin(s.context_tokens))
        bins.setdefault(key + (octave_bin(s.prefill_context),), []).append(s)
    pooled = sorted(bins.items())
    return [median_sample(steps) for _, steps in pooled], [len(steps) for _, steps in pooled]
