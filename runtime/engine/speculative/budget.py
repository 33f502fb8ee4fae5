"""Which proposals a step verifies: those whose expected accepted tokens pay for the rows they add.

A proposed token costs a row of the step whether it is accepted or not. Two things are measured as the engine runs:
the time of whole engine steps that only decode against their rows (a least-squares line, t = a + b * rows, weighted
toward recent steps), and each sequence's acceptance rate per proposed token. The i-th token of a proposal from a
sequence accepting at rate r is accepted with probability r^i (every token before it must be). Proposal tokens are
taken best first while each adds tokens faster than the step produces them already:
r^i / b > (sampled + expected accepted) / (a + b * rows). SmolLM2 on two cores measures about 10 ms a step and
2-3 ms a row: at one sequence a modest rate pays, at sixteen only near-certain guesses (a sequence echoing its
context) do."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from sagellm.runtime.engine.sequence import Sequence

DECAY = 0.98  # weight of what was measured before each new step or verification
PRIOR_RATE = 0.5  # a sequence's acceptance rate before it has been measured ...
PRIOR_TOKENS = 2.0  # ... weighing as much as this many proposed tokens
OUTLIER = 2.0  # a step is counted at most this many times what the line predicts for it
PRIOR_STEPS = 4.0  # the slope's prior: flat, as if measured on this many steps a row apart


@dataclass
class _Acceptance:
    accepted: float = PRIOR_RATE * PRIOR_TOKENS
    proposed: float = PRIOR_TOKENS

    @property
    def rate(self) -> float:
        return self.accepted / self.proposed

    def forget(self) -> None:
        self.accepted = PRIOR_RATE * PRIOR_TOKENS + (self.accepted - PRIOR_RATE * PRIOR_TOKENS) * DECAY
        self.proposed = PRIOR_TOKENS + (self.proposed - PRIOR_TOKENS) * DECAY


class SpecBudget:
    def __init__(self) -> None:
        self._sums = [0.0] * 5  # weighted n, sum x, sum y, sum xx, sum xy of (step tokens, seconds)
        self._acceptance: weakref.WeakKeyDictionary[Sequence, _Acceptance] = weakref.WeakKeyDictionary()

    def step_took(self, tokens: int, seconds: float) -> None:
        """Adds a decoding step to the line; one far slower than the line predicts (a pause of the process, a
        neighbour's burst) counts as OUTLIER times the prediction, so one hiccup cannot stop speculation for long."""
        if self._sums[0] >= PRIOR_STEPS:
            a, b = self.line()
            seconds = min(seconds, OUTLIER * (a + b * tokens))
        new = (1.0, tokens, seconds, tokens * tokens, tokens * seconds)
        self._sums = [s * DECAY + d for s, d in zip(self._sums, new)]

    def verified(self, seq: Sequence, proposed: int, accepted: int) -> None:
        stats = self._acceptance.setdefault(seq, _Acceptance())
        stats.accepted = stats.accepted * DECAY**proposed + accepted
        stats.proposed = stats.proposed * DECAY**proposed + proposed

    def line(self) -> tuple[float, float]:
        """(a, b): seconds per step and per row. Steps all of one size say nothing of the slope: it is then flat
        (as if PRIOR_STEPS more steps a row apart had cost the same), so speculation starts and shows what rows
        cost."""
        n, sx, sy, sxx, sxy = self._sums
        if n <= 0:
            return 0.0, 0.0
        mean_x, mean_y = sx / n, sy / n
        var = sxx - n * mean_x * mean_x
        slope = max(0.0, (sxy - n * mean_x * mean_y) / (var + PRIOR_STEPS)) if n > 1 else 0.0
        return max(mean_y - slope * mean_x, 0.0), slope

    def choose(self, proposals: dict[Sequence, list[int]], step_tokens: int, sampled: int) -> None:
        """Trims each sequence's proposal, in place, to the tokens worth verifying in a step that computes
        `step_tokens` tokens and samples `sampled` without them."""
        a, b = self.line()
        if b <= 0.0:
            return  # rows look free: verify everything proposed
        ranked = sorted(
            ((self._rate(seq) ** (i + 1), seq, i + 1) for seq, drafts in proposals.items() for i in range(len(drafts))),
            key=lambda item: item[0],
            reverse=True,
        )
        keep: dict[Sequence, int] = dict.fromkeys(proposals, 0)
        gained, rows = float(sampled), float(step_tokens)
        for chance, seq, length in ranked:
            if chance / b <= gained / (a + b * rows) or keep[seq] != length - 1:
                continue
            keep[seq] = length
            gained, rows = gained + chance, rows + 1
        for seq, drafts in proposals.items():
            del drafts[keep[seq] :]
            if not drafts and (stats := self._acceptance.get(seq)) is not None:
                stats.forget()  # unmeasured for a step: its rate drifts back to the prior, to be tried again

    def _rate(self, seq: Sequence) -> float:
        stats = self._acceptance.get(seq)
        return stats.rate if stats is not None else PRIOR_RATE
