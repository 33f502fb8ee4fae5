"""How the classes that yield (`low` and after, `priority_classes.py`) share the engine with the others: a batch job
beside live traffic, on hardware that has no compute to spare for it.

On a CPU every prompt token a step computes lengthens it for everyone in it: SmolLM2's W1-c4 decode steps take
~25 ms on a 2-core EPYC, and 48 prompt tokens ~100 ms more. Letting a batch's prompts take even a small chunk of
every step made the live requests' TPOT 3.4x and their TTFT p99 1.5-1.9x (`sagellm bench batch`). So:

- their prompts compute at most YIELDING_STEP_TOKENS a step between them, even with nothing else in the engine, so
  a live request arriving waits for a short step under way, not a full one (the step's whole budget of a batch's
  prompts is ~1 s there);
- while a sequence of a higher class runs or waits, they compute only what they have earned: YIELDING_SHARE of the
  tokens the higher classes computed, taken a whole YIELDING_STEP_TOKENS at a time (a step's fixed cost is paid
  for a chunk, not a sliver), and nothing in a step that can start a higher class's short prompt
  (`long_prefills.py`): the batch then adds about a tenth to the live requests' work, in a short step now and then;
- their decodes join every step: a row more in a memory-bound step costs far less than a prompt token.

These ride on the prefill shares: with the long-prefill threshold 0 (all shares off) they are off too."""

from __future__ import annotations

from collections.abc import Iterable

from sagellm.runtime.engine.priority_classes import YIELDING_PRIORITY
from sagellm.runtime.engine.sequence import Sequence

YIELDING_STEP_TOKENS = 64  # the yielding prompts' tokens in one step: ~130 ms on the 2-core EPYC above
YIELDING_SHARE = 8  # beside a higher class, one token earned for every 8 the higher classes compute


class YieldingCredit:
    """What the yielding classes may compute in the step to come (`plan`), and what they earned by it (`stepped`)."""

    def __init__(self) -> None:
        self.credit = 0.0  # prompt tokens earned beside the higher classes, at most a step's worth

    def plan(self, seqs: Iterable[Sequence]) -> tuple[int | None, int]:
        """For the `seqs` running and waiting: the priority from which classes yield this step (None: no higher
        class is here, none yields), and the prompt tokens the yielding ones may compute in it."""
        if not any(seq.priority < YIELDING_PRIORITY for seq in seqs):
            return None, YIELDING_STEP_TOKENS
        return YIELDING_PRIORITY, YIELDING_STEP_TOKENS if self.credit >= YIELDING_STEP_TOKENS else 0

    def stepped(self, scheduled: dict[Sequence, int], yielding_from: int | None, spent: int) -> None:
        """A step computes `scheduled` (sequence -> its tokens), `spent` of them the yielding classes' prompts."""
        if yielding_from is None:
            return
        earned = sum(n for seq, n in scheduled.items() if seq.priority < yielding_from) / YIELDING_SHARE
        self.credit = min(float(YIELDING_STEP_TOKENS), self.credit + earned - spent)
