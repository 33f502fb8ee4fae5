"""The engine's one handle on speculative decoding: its proposer, the budget that picks what a step verifies, and
the counters /metrics shows."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sagellm.runtime.engine.scheduler import ScheduledBatch
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.speculative.budget import SpecBudget
from sagellm.runtime.engine.speculative.config import SpeculativeConfig
from sagellm.runtime.engine.speculative.methods import make_proposer
from sagellm.runtime.engine.speculative.proposers import ProposerContext, TargetStep
from sagellm.runtime.engine.speculative.verify import SpecDecodeStats


@dataclass(frozen=True)
class StepTimer:
    """An engine step as the budget weighs it (`Speculator.step_ended`): timed whole, from before the speculator
    proposes to after the step's outputs, and counted only when every row it computes samples (`decoding`: each
    sequence's next token and its proposals), which its batch says before the step moves its sequences on."""

    started: float
    rows: int
    decoding: bool

    @classmethod
    def of(cls, batch: ScheduledBatch, started: float) -> StepTimer:
        """The timer of a step that started at `started` (`time.perf_counter`) and runs `batch`."""
        return cls(started, batch.total_tokens, batch.samples_every_row)


class Speculator:
    def __init__(self, config: SpeculativeConfig, context: ProposerContext, max_num_batched_tokens: int) -> None:
        self.config = config
        self.proposer = make_proposer(config, context)
        self.budget = SpecBudget()
        self.stats = SpecDecodeStats()
        self._max_model_len = context.cache.max_model_len
        self._max_step_tokens = max_num_batched_tokens

    def propose(self, running: list[Sequence], may_speculate: Callable[[Sequence], bool]) -> None:
        """Gives each running sequence that decodes (and `may_speculate`) the tokens its proposer guesses will
        follow, as many as its limits leave room for (a request that stops at max_tokens or the context never
        verifies a token beyond) and, unless not adaptive, the measured costs and acceptance pay for."""
        k = self.config.num_speculative_tokens
        asks: list[tuple[Sequence, int]] = []
        step_tokens = sampled = 0
        for seq in running:
            seq.spec_token_ids = []  # last step's, if the budget left it unscheduled: guessed from older tokens
            step_tokens += seq.num_tokens - seq.num_computed_tokens
            if seq.num_computed_tokens != seq.num_tokens - 1:
                continue
            sampled += 1
            if not may_speculate(seq):
                continue
            room = min(k, self._max_model_len - seq.num_tokens)
            if seq.params.max_tokens is not None:
                room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
            if room > 0:
                asks.append((seq, room))
        guesses = self.proposer.propose_batch(asks)
        proposals = {seq: drafts for (seq, _), drafts in zip(asks, guesses) if drafts}
        if proposals and self.config.adaptive:
            self.budget.choose(proposals, min(step_tokens, self._max_step_tokens), sampled)
        for seq, drafts in proposals.items():
            seq.spec_token_ids = drafts

    def verified(self, seq: Sequence, accepted: int) -> None:
        """`seq`'s proposals were checked and `accepted` of them kept."""
        self.stats.count(len(seq.spec_token_ids), accepted)
        self.budget.verified(seq, len(seq.spec_token_ids), accepted)

    def step_ended(self, step: StepTimer, running: list[Sequence]) -> None:
        """Tells the proposer which sequences still run and, after a step of decoding rows only (what speculation
        weighs), the budget how long the step took, whole."""
        self.proposer.keep_only(running)
        if step.decoding:
            self.budget.step_took(step.rows, time.perf_counter() - step.started)

    def step_done(self, step: TargetStep) -> None:
        self.proposer.step_done(step)

    def close(self) -> None:
        self.proposer.close()
