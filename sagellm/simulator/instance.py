"""One simulated engine instance: our engine's scheduler (`runtime/engine/scheduler.py`, the vLLM v1 shape) on a
simulated clock, each step timed by the `StepModel`.

Each step gives every running decode sequence one token and fills the rest of `max_num_batched_tokens` with prompt
chunks, first of the running sequence still in prefill, then of waiting sequences in arrival order while fewer than
`max_num_seqs` run (chunked prefill, continuous batching). A prompt's first token comes at the end of the step that
computes its last chunk; its last token `output_tokens - 1` steps later. The engine walks its running list in order
and prefills only with what budget is left, so with `max_num_seqs <= max_num_batched_tokens` every decode always gets
its token and at most one running sequence is part-way through its prompt: exactly the rule above.

Roles, as the engine operators': a "prefill" instance (a prefill worker) computes prompts only; a request leaves it
when its last chunk is computed (`advance` returns it, with no first token: that comes from the decode worker). A
"decode" instance also takes prefilled requests (`admit(prefilled=True)`): their prompt's KV arrived, so they wait
for a slot like any request; at the step boundary where one joins, the instance first copies its KV into its cache
(`import_per_token_s` a prompt token, as the decode worker's `add` runs between two steps), emits its first token,
and then runs the step, in which it decodes.

Instances on one host (`neighbours`) slow each other: a step planned while a neighbour computes takes its model's
neighbour slowdown longer (`contend`), and a span of decode steps is cut at its next step boundary when a neighbour
starts or stops computing (`cut`), so that it goes on at the other speed. A step with prompt chunks keeps the speed it
started at (an approximation: a decode worker's such step is short next to a prefill worker's busy or idle stretch,
and a prefill worker's chunk runs beside a decode worker that is mostly busy throughout).

What is not modelled: the KV cache's size (no preemption: the instance is assumed to hold `max_num_seqs` sequences
at full length), prefix caching (prompts have lengths, not contents), LoRA slots and `n` groups (a request is one
sequence of the base model), and the long-prefill rules (`runtime/engine/long_prefills.py`): the instance schedules as
an engine with `long_prefill_token_threshold` 0, which tests/simulator/test_scheduler_agreement.py holds it to by
running the real `Scheduler` on the same traces.

Speed: a step that computes prompt tokens is one event. Between such steps the batch is decode only and its
composition fixed until the first of its sequences finishes, so those steps differ only in context, which grows by
`decode_seqs` tokens a step: step k takes a + b*k, and k steps take k*a + b*k*(k-1)/2. The instance plans such a run
(a span) as one event; a request admitted mid-span cuts it at the first step boundary after its arrival, as the
engine would start a step with it there. tests/simulator checks the result against a step-by-step simulation."""

from __future__ import annotations

import heapq
import math
from collections import deque

from sagellm.runtime.pipeline.operator import InstanceStats
from sagellm.simulator.step_model import StepModel


class Instance:
    """The instance's state is exact at `t`, a step boundary; its next event is the end of the planned step (or
    span of decode steps) at `end`. Request data (lengths, first-token and finish times) live in the simulation's
    per-request lists, which the instance shares."""

    __slots__ = (
        "index", "stats", "model", "prompts", "outputs", "first", "finish", "max_seqs", "budget", "per_context",
        "waiting", "prefilling", "left", "decoding", "n_dec", "ctx", "step_no", "sum_end", "prefill_left",
        "undecoded", "t", "end", "span", "chunks", "a", "b", "version", "accepting", "added", "prefill_only",
        "import_per_token_s", "neighbours", "was_computing",
    )  # fmt: skip

    def __init__(
        self,
        index: int,
        stats: InstanceStats,
        model: StepModel,
        prompts: list[int],
        outputs: list[int],
        first: list[float],
        finish: list[float],
    ) -> None:
        self.index, self.stats, self.model = index, stats, model
        self.prompts, self.outputs, self.first, self.finish = prompts, outputs, first, finish
        self.max_seqs, self.budget = model.max_num_seqs, model.max_num_batched_tokens
        self.per_context = model.per_context_token_s
        self.waiting: deque[int] = deque()  # routed here, not yet scheduled (the engine's waiting queue)
        self.prefilling: list[int] = []  # running, prompt not all computed (at most one, see the module docstring)
        self.left: dict[int, int] = {}  # prompt tokens still to compute, by request
        self.decoding: list[tuple[int, int]] = []  # heap of (step number at which it ends, request)
        self.n_dec = 0  # decoding sequences
        self.ctx = 0  # their context tokens: prompt + tokens generated so far, summed
        self.step_no = 0  # steps completed; a decoding sequence has generated 1 + steps since its first token
        self.sum_end = 0  # its end steps, summed: the decode tokens still to come are sum_end - n_dec * step_no ...
        self.undecoded = 0  # ... plus the outputs of the sequences not decoding yet
        self.prefill_left = 0  # prompt tokens still to compute, summed
        self.t = 0.0
        self.end: float | None = None  # when the planned work ends (None: idle)
        self.span = 0  # decode-only steps planned (0: one step with prompt chunks, `chunks`)
        self.chunks: list[tuple[int, int]] = []
        self.a = self.b = 0.0  # the span's first step time and its growth per step
        self.version = 0  # bumped by every new plan: the simulation's heap drops events of older ones
        self.accepting = True  # False while draining: no new requests, removed when empty
        self.added = False  # added by the autoscaler (only those are removed)
        self.prefill_only = stats.role == "prefill"  # a prefill worker: its requests leave once prefilled
        self.import_per_token_s = 0.0  # a decode worker: copying a prefilled request's KV in, per prompt token
        self.neighbours: tuple[Instance, ...] = ()  # the other instances on its host
        self.was_computing = False  # whether its last plan computed: the neighbours' speed changes when it flips

    @property
    def busy(self) -> bool:
        return bool(self.n_dec or self.prefilling or self.waiting)

    @property
    def running(self) -> int:
        return self.n_dec + len(self.prefilling)

    @property
    def computing(self) -> bool:
        """Work planned from `t` (a cut span's boundary, or idle, is not)."""
        return self.end is not None and self.end > self.t

    def admit(self, i: int, now: float, *, prefilled: bool = False) -> float | None:
        """Request `i` joins the waiting queue at `now` (`prefilled`: its prompt's KV came from a prefill worker,
        with its first token; it needs a slot and decodes the rest). Returns the time of a new next event when the
        plan changed (an idle instance is at a step boundary now; a decode span is cut at its first step boundary at
        or after `now`), else None (a step with prompt chunks is under way, every slot is taken, or the instance is
        at a boundary already: it joins the step planned there)."""
        self.waiting.append(i)
        if prefilled:
            self.left[i] = 0
            self.undecoded += self.outputs[i] - 1
        else:
            self.left[i] = prompt = self.prompts[i]
            self.prefill_left += prompt
            self.undecoded += 0 if self.prefill_only else self.outputs[i]
        if self.end is None:
            return self._boundary(now, 0)
        if self.running < self.max_seqs:
            return self.cut(now)
        return None

    def cut(self, now: float) -> float | None:
        """Cuts a span of decode steps at its first step boundary at or after `now`, where the next step is planned
        afresh; returns that boundary's time (None: no span under way, or it ends there anyway)."""
        if self.span:
            done = self._steps_by(now)
            if done < self.span:
                return self._boundary(self.t + self._span_s(done), done)
        return None

    def contend(self, now: float) -> None:
        """Slows the work `compose` planned by the model's neighbour slowdown when a neighbour computes past `now`."""
        if self.end is None or not any(n.end is not None and n.end > now for n in self.neighbours):
            return
        factor = 1 + self.model.neighbour_slowdown(bool(self.chunks))
        self.end = self.t + (self.end - self.t) * factor
        self.a, self.b = self.a * factor, self.b * factor

    def advance(self) -> list[int]:
        """At `end`: applies the planned work and stops at that step boundary; returns the requests that finished
        (on a prefill instance: those whose prompt it finished, which go on to a decode instance).
        The next step is planned by `compose`, once the requests routed at this instant have joined (the engine
        schedules a step with everything that reached it by then)."""
        now = self.end
        assert now is not None
        finished: list[int] = []
        if self.span:
            k = self.span
            self.step_no += k
            self.ctx += k * self.n_dec
        elif self.chunks:
            self.step_no += 1
            self.ctx += self.n_dec
            tokens = 0
            step_no, outputs = self.step_no, self.outputs
            self._finish_due(now, finished)
            for i, c in self.chunks:
                tokens += c
                self.prefill_left -= c
                left = self.left[i] - c
                if left:
                    self.left[i] = left
                    continue
                del self.left[i]
                self.prefilling.remove(i)
                if self.prefill_only:
                    finished.append(i)
                    continue
                self.first[i] = now
                out = outputs[i]
                self.undecoded -= out
                if out == 1:
                    self.finish[i] = now
                    finished.append(i)
                    continue
                self._decode_from(i, step_no)
            self._learn(tokens, now - self.t)
        self._finish_due(now, finished)
        self.version += 1
        self.t, self.span, self.chunks = now, 0, []
        return finished

    def refresh(self, now: float) -> None:
        """Writes the engine's load report into `stats` as of `now` (its decode tokens fall during a span)."""
        stats = self.stats
        stats.running = self.n_dec + len(self.prefilling) + len(self.waiting)
        stats.waiting = len(self.waiting)
        stats.queued_prefill_tokens = self.prefill_left
        step = self.step_no + (self._steps_by(now) if self.span and self.end is not None else 0)
        stats.queued_decode_tokens = self.sum_end - self.n_dec * step + self.undecoded

    # -- planning ---------------------------------------------------------------------------------------------
    def _boundary(self, t: float, done: int) -> float:
        """Plans nothing but a step boundary at `t`, reached after `done` more decode steps of the current span
        (a cut; 0 for an idle instance): the step that starts there is decided there, with whatever arrived by then."""
        self.version += 1
        if done:
            self.step_no += done
            self.ctx += done * self.n_dec
        self.t, self.span, self.chunks, self.end = t, 0, [], t
        return t

    def compose(self, t: float) -> None:
        """Plans the work from the boundary at `t`: one step with prompt chunks, else a span of decode steps up to the
        first finish, else nothing (idle); prefilled requests that join have their KV copied in first."""
        self.version += 1
        budget = self.budget - self.n_dec
        copying = 0.0
        chunks: list[tuple[int, int]] = []
        for i in self.prefilling:
            c = min(self.left[i], budget)
            chunks.append((i, c))
            budget -= c
        running = self.n_dec + len(self.prefilling)
        while self.waiting and budget > 0 and running < self.max_seqs:
            i = self.waiting.popleft()
            running += 1
            if not self.left[i]:  # prefilled elsewhere: its KV copied in, its first token out, it decodes in this step
                copying += self.import_per_token_s * self.prompts[i]
                self.first[i] = t + copying
                self._decode_from(i, self.step_no)
                del self.left[i]
                self.undecoded -= self.outputs[i] - 1
                budget -= 1
                continue
            self.prefilling.append(i)
            c = min(self.left[i], budget)
            chunks.append((i, c))
            budget -= c
        t += copying
        self.t = t
        prefill = self.budget - self.n_dec - budget
        if prefill:
            self.span, self.chunks = 0, chunks
            earlier = sum(c * (self.prompts[i] - self.left[i]) for i, c in chunks)  # attended by each chunk
            self.end = t + self.model.step_s(prefill, self.n_dec, self.ctx, earlier)
        elif self.n_dec:
            self.span, self.chunks = self.decoding[0][0] - self.step_no, []
            self.a = self.model.step_s(0, self.n_dec, self.ctx)
            self.b = self.per_context * self.n_dec
            self.end = t + self._span_s(self.span)
        else:
            self.span, self.chunks, self.end = 0, [], None

    def _span_s(self, k: int) -> float:
        """Seconds of the span's first `k` steps."""
        return k * self.a + self.b * (k * (k - 1) / 2)

    def _steps_by(self, now: float) -> int:
        """The span's steps done at its first boundary at or after `now`: where a request arriving at `now` joins."""
        elapsed = now - self.t
        if elapsed <= 0:
            return 0
        if self.b > 0:  # b/2 k^2 + (a - b/2) k - elapsed = 0
            p = self.a - self.b / 2
            k = math.ceil((-p + math.sqrt(p * p + 2 * self.b * elapsed)) / self.b)
        else:
            k = math.ceil(elapsed / self.a) if self.a > 0 else 0
        while k > 0 and self._span_s(k - 1) >= elapsed:
            k -= 1
        while self._span_s(k) < elapsed:
            k += 1
        return k

    def _decode_from(self, i: int, step_no: int) -> None:
        """Request `i`, its first token out at the end of step `step_no`, decodes one token a step from the next."""
        end = step_no + self.outputs[i] - 1
        heapq.heappush(self.decoding, (end, i))
        self.sum_end += end
        self.n_dec += 1
        self.ctx += self.prompts[i] + 1

    def _finish_due(self, now: float, finished: list[int]) -> None:
        decoding, step_no = self.decoding, self.step_no
        while decoding and decoding[0][0] <= step_no:
            end, i = heapq.heappop(decoding)
            self.sum_end -= end
            self.n_dec -= 1
            self.ctx -= self.prompts[i] + self.outputs[i]
            self.finish[i] = now
            finished.append(i)

    def _learn(self, prompt_tokens: int, elapsed: float) -> None:
        """The engine operator's prefill rate: an EWMA (0.8 / 0.2) of the prompt tokens a second of each step that
        computed some."""
        if prompt_tokens and elapsed > 0:
            self.stats.tokens_per_s = 0.8 * self.stats.tokens_per_s + 0.2 * (prompt_tokens / elapsed)
