"""Every step of an engine, timed, with what it computed: the simulator's step model is fitted to these
(`sagellm bench steps`), and `SAGELLM_STEP_TRACE=DIR` makes every engine node, in whichever process runs it (a PD
worker's too), write its steps to `DIR/NODE-PID.jsonl`, so a step can be timed where it is served.

What a step computed is read from the scheduler's own batch (`Scheduler.schedule` is the one door every step goes
through), its time is the wall time around `engine.step()`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TRACE_ENV = "SAGELLM_STEP_TRACE"
TRACE_FLUSH_STEPS = 512  # a trace file is appended to every this many steps (and at close)


@dataclass(frozen=True)
class TimedStep:
    """One engine step: perf_counter start and end; prompt tokens of its chunks, decode sequences, the KV the
    decodes attend over (as the model runner counts it) and the earlier prompt tokens the chunks attend over;
    whether the engine still had work after it (then the next step follows at once, and the time between is the
    executor's turn, part of serving); the CPU time of the thread that stepped it, which falls short of the wall
    time when the thread waited for a core (more threads than cores) rather than ran slower."""

    started: float
    ended: float
    prefill_tokens: int
    decode_seqs: int
    context_tokens: int
    prefill_context: int
    busy_after: bool
    cpu: float = 0.0

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class StepTimer:
    """Times every `engine.step()` of an `LLMEngine`. With `log` set, every step that computed something is
    appended to it; `last` is the latest step either way."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._schedule, self._step = engine.scheduler.schedule, engine.step
        engine.scheduler.schedule = self._recording_schedule
        engine.step = self._timed_step  # whoever steps the engine (a benchmark, an engine operator)
        self._composition = (0, 0, 0, 0)
        self.last = TimedStep(0.0, 0.0, 0, 0, 0, 0, False)
        self.log: list[TimedStep] | None = None

    def _recording_schedule(self) -> Any:
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
        started, cpu = time.perf_counter(), time.thread_time()
        outputs = self._step()
        ended, cpu = time.perf_counter(), time.thread_time() - cpu
        prefill, decodes, context, earlier = self._composition
        self._composition = (0, 0, 0, 0)
        busy = self.engine.has_unfinished_requests()
        self.last = TimedStep(started, ended, prefill, decodes, context, earlier, busy, cpu)
        if self.log is not None and (prefill or decodes):
            self.log.append(self.last)
        return outputs

    def step(self) -> TimedStep:
        self.engine.step()
        return self.last


class StepTraceFile:
    """An engine's steps appended to `DIR/NODE-PID.jsonl` (`SAGELLM_STEP_TRACE=DIR`), one JSON object a step."""

    def __init__(self, engine: Any, directory: str | Path, node_id: str) -> None:
        self.path = Path(directory) / f"{node_id}-{os.getpid()}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timer = StepTimer(engine)
        self.timer.log = []

    @classmethod
    def from_env(cls, engine: Any, node_id: str) -> StepTraceFile | None:
        directory = os.environ.get(TRACE_ENV)
        return cls(engine, directory, node_id) if directory else None

    def flush(self, *, every: int = TRACE_FLUSH_STEPS) -> None:
        """Appends the steps timed so far once there are `every` of them (0: now)."""
        log = self.timer.log
        if log is None or len(log) < max(every, 1):
            return
        with self.path.open("a") as f:
            f.writelines(json.dumps(asdict(step)) + "\n" for step in log)
        log.clear()

    def close(self) -> None:
        self.flush(every=0)


def read_trace(path: str | Path) -> list[TimedStep]:
    return [TimedStep(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
