"""A request's engine state: what the engine keeps of a request beside its `Sequence` (which the scheduler and the
runner read), to turn its tokens into outputs.

Every feature that follows a request token by token keeps its place here: the detokenizer (stop strings), the
logprobs so far, the grammar (`matcher`), the thinking budget, a prefill worker's hand-over. One type in a module of
its own, so the intake that makes it (request_intake.py), the output processor that ends it (output_processor.py)
and the mask filler that reads it (guided_masks.py) share it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from sagellm.runtime.engine.detokenizer import IncrementalDetokenizer
from sagellm.runtime.engine.grammar import GuidedMatcher
from sagellm.runtime.engine.outputs import RequestMetrics
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.thinking import ThinkingTracker


@dataclass(eq=False)
class RequestState:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    metrics: RequestMetrics
    logprobs: list | None = None
    prefill_only: bool = False  # a prefill worker's request: stop after the first token and hand over the KV
    export_kv: bool = False  # prefill_only, and the KV goes out even when the first token ended the request
    matcher: GuidedMatcher | None = None  # where a guided request stands in its grammar
    thinking: ThinkingTracker | None = None  # where a budgeted request stands with its thinking

    @property
    def masker(self) -> GuidedMatcher | ThinkingTracker | None:
        """What fills the allowed-token mask of its next token: its grammar, or its thinking budget while that forces
        the closing tokens; None when any token may come."""
        return self.matcher or (self.thinking if self.thinking and self.thinking.forcing else None)

    @property
    def may_speculate(self) -> bool:
        """Guided requests (their masks follow one token at a time), budgeted thinking not yet closed (its closing
        tokens may be forced) and prefill workers' (they stop after one) do not speculate."""
        return self.matcher is None and not self.prefill_only and (self.thinking is None or self.thinking.done)
