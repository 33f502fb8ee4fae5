"""What `sagellm bench steps` measures and how: the engine settings, the in-pipeline calibration trace's shape
(`step_calibration`) and the bare engine's grid of compositions (`step_times`)."""

from __future__ import annotations

from dataclasses import dataclass

from sagellm.common.errors import InvalidInput


@dataclass(frozen=True)
class StepBenchConfig:
    model: str  # a path; the command resolves aliases
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    threads: int | None = None  # torch threads (None: every core, as an engine node without num_threads)
    bare: bool = False  # time the bare engine on the grid below, not the engine serving in the colocated graph
    # -- in the pipeline: the calibration trace (`calibration_trace`)
    trace_limits: tuple[int, ...] | None = None  # requests in flight, phase by phase (None: 1, 2, 3, 4, 6, 8, ...)
    trace_prompt_lens: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 2048)  # uniformly
    trace_output_lens: tuple[int, ...] = (4, 16, 32, 64, 128)  # drawn uniformly
    # a second climb with only short prompts (empty: none): decode batches of every size over short contexts
    trace_short_prompt_lens: tuple[int, ...] = (16, 32, 64, 128)
    trace_short_output_lens: tuple[int, ...] = (16, 32, 64)
    trace_turnover: int = 2  # a phase releases `limit + trace_turnover` requests (the last phase twice that)
    # -- bare: the grid of compositions
    context_lens: tuple[int, ...] = (64, 512, 1024)  # prompt lengths of the decoding requests
    chunk_sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 384, 512)  # prefill chunks, capped by the token budget
    long_prompt_lens: tuple[int, ...] = (2048,)  # prompts timed chunk by chunk: chunks after earlier prompt tokens
    mixed_batch_sizes: tuple[int, ...] = (1, 4, 8, 15)  # running decodes beside which prefill chunks are timed
    mixed_chunk_sizes: tuple[int, ...] = (32, 128, 512)  # capped by what the decodes leave of the budget
    mixed_long_len: int = 1536  # a prompt timed chunk by chunk beside the decodes of the first context length
    repeats: int = 5  # timed steps per composition: a sample is their median
    warmup: int = 1  # untimed steps before each decode timing (the first after a change re-reads the batch)
    window_s: float = 0.15  # a composition is timed for at least `repeats` steps and this long (the load's ticks)
    quiet_cores: float = 0.3  # a timing while the rest of the machine kept more cores busy is retried ...
    retries: int = 3  # ... this many times; the quietest is kept (and flagged when still not quiet)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.repeats) < 1 or self.warmup < 0:
            raise InvalidInput("max_num_seqs, max_num_batched_tokens and repeats must be >= 1, warmup >= 0")
        if not self.context_lens or min(self.context_lens) < 1 or not self.chunk_sizes or min(self.chunk_sizes) < 2:
            raise InvalidInput("context_lens must be >= 1 and chunk_sizes >= 2 tokens (a 1-token chunk is a decode)")
        if min(self.trace_prompt_lens, default=0) < 2 or min(self.trace_output_lens, default=0) < 1:
            raise InvalidInput("trace_prompt_lens must be >= 2 tokens and trace_output_lens >= 1")
        if bool(self.trace_short_prompt_lens) != bool(self.trace_short_output_lens):
            raise InvalidInput("trace_short_prompt_lens and trace_short_output_lens: both or neither")
        if min(self.trace_short_prompt_lens, default=2) < 2 or min(self.trace_short_output_lens, default=1) < 1:
            raise InvalidInput("trace_short_prompt_lens must be >= 2 tokens and trace_short_output_lens >= 1")

    @property
    def limits(self) -> tuple[int, ...]:
        """The calibration trace's phases: requests in flight, climbing to `max_num_seqs`."""
        if self.trace_limits is not None:
            return self.trace_limits
        ladder = (1, 2, 3, 4, 6, 8, 11, 14)
        return tuple(n for n in ladder if n < self.max_num_seqs) + (self.max_num_seqs,)
