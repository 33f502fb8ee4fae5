"""Long prompts share the engine: vLLM's `--long-prefill-token-threshold`, `--max-num-partial-prefills` and
`--max-long-partial-prefills`, as one step's shares of the prefill work.

Chunked prefill alone lets one prompt of thousands of tokens (or a batch of prompts scored for their logprobs) take
the whole token budget of step after step, so a short chat arriving meanwhile waits for steps each as long as the
budget allows. With a threshold T:

- a prompt with more than T tokens left to compute is *long*: it computes at most T of them a step (vLLM v1's rule),
  so every step stays about as long as T tokens make it, whatever else waits. Deeper into a long prompt each token
  also attends to every one before it, and a chunk of T tokens after 6,000 costs several times its first one. So a
  long prompt's chunk after c computed tokens is T * S / (S + c), to its end, S the context at which a token's
  attention costs what its linear layers do (`context_scale`), and each of its steps costs about what its first
  did. The engine sets S to 2 x the hidden size: 6 x in FLOPs for a dense transformer, a third of it because a CPU
  runs attention at about a third of the linears' rate (SmolLM2's steps on one thread of an AVX2 EPYC, 14-18 tokens
  deep in a 6,000-token prompt: S = 1,250-1,400; 2 x 576 = 1,152);
- what a quarter of a long prompt's chunk or less would leave is taken with that chunk (a step for a few tokens pays
  a step's fixed cost, and a prompt's last token alone looks like a decode to whoever times the steps);
- a prompt whose prefill goes on past a step holds one of `max_num_partial_prefills` seats until it ends, and a long
  one one of `max_long_partial_prefills` too; a waiting prompt that has no seat waits, and the shorter prompts behind
  it start ahead of it (vLLM v0's rule), so short chats are never queued behind long prompts;
- a step that can start a waiting short prompt (T tokens or fewer) leaves the long prompts' chunks for the next
  (the scheduler allows this `MAX_LONG_HOLDS` steps in a row, so a long prompt still gets every few steps): a
  short chat's first token then waits for the step under way and one short step of its own, not for a long chunk
  beside it (ours: vLLM splits the step's budget between them instead);
- by the engine's default (not with vLLM's threshold set), a long prompt alone in the engine (nothing else running
  or waiting, and no prompt that is not long arrived for SHORTS_QUIET_S: a server that chats may chat again) takes
  the whole budget of its step: nobody
  waits on its chunk, and its own time is then not multiplied by small steps (each re-reads every weight, re-lays the
  keys out for attention, and pays a step's fixed cost: SmolLM2's 3,072-token prompt alone in 64 steps of its chunks
  6.0 s, in 6 steps of a 512-token budget 3.5 s, on a 2-core AMD EPYC). A chat arriving meanwhile waits for the
  step under way, then has a step of its own, and the long prompt's chunks are its share again from then on;
- a step scores at most T prompt positions for prompt logprobs (`echo` with `logprobs`), whoever asked (`scored_tokens`
  may set it apart): each adds a row of the vocabulary projection and its log-softmax to the step.

The classes that yield (`low` and after: a batch job's requests) take their shares by `yielding.py`'s rules: a
step's worth of prompt tokens between them at most, held in a step that can start a higher class's short prompt;
beside a higher class their prompts hold no seat of the partial prefills, which a live long prompt would wait for.

T = 0 turns all of it off: each prompt takes what the budget leaves, as before. The chunk may be set apart from
what counts as long (`chunk_tokens`): the engine's default (`long_prefill_shares`) calls long only the prompts that
take several steps anyway (more than a step's budget) and those scored for prompt logprobs past the scored share, so
prompts that fit a step run as fast as without any of this (W1's 256-token prompts: throughput as with T = 0), and
gives each long one AUTO_CHUNK_TOKENS a step, and scores AUTO_SCORED_TOKENS prompt positions a step. The
seats are counted afresh each step from the running sequences, so there is no state to keep in step with
preemption or aborts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from sagellm.runtime.engine.priority_classes import YIELDING_PRIORITY, yields
from sagellm.runtime.engine.sequence import Sequence, SequenceStatus

# How long after the last prompt that was not long a long prompt alone still takes its share, not whole steps: a chat
# arriving during a whole step waits for it (a 512-token step is 5x a quiet chat's TTFT on a 2-core AMD EPYC, and the
# first chat beside a 6,000-token prompt then missed `sagellm bench fairness`'s 3x: 3.6x, against 1.1x with shares).
# Agents' and batch jobs' long prompts come without chats between them; a server chats in bursts seconds apart.
SHORTS_QUIET_S = 10.0
MAX_LONG_HOLDS = 3  # steps in a row short prompts may have alone: a long prompt computes in one step of four at least
# A long prompt's tokens a step, the threshold left to the engine. A chat arriving mid-step waits for the step under
# way, then its own prefill: on one thread of a 2-core CPU 48 tokens make a ~400 ms step beside a ~280 ms quiet TTFT,
# within 3x at p99 beside a 6,000-token prompt (`sagellm bench fairness`); 64 made 525 ms, at 2.7-3.2x. Smaller
# chunks cost the long prompt little: its time is its attention's, however cut (a few more steps' fixed cost).
AUTO_CHUNK_TOKENS = 48
# Prompt positions scored a step, the threshold left to the engine. A scored prompt is shallow (lm-eval's are a few
# hundred tokens), so its chunks do not shrink as a 6,000-token prompt's do, and each row costs a vocabulary projection
# more: 64 of them made 600-750 ms steps on one thread beside a 280 ms quiet TTFT (2.4-3.6x at p99, `sagellm bench
# fairness --cases echo`); 32 halve that for a few more steps of a batch scoring job.
AUTO_SCORED_TOKENS = 32


def long_prefill_shares(threshold: int | None, budget: int) -> dict[str, int | bool]:
    """The scheduler's threshold and chunk for the engine's `long_prefill_token_threshold` (None: the default, long
    past the step's `budget`, AUTO_CHUNK_TOKENS a step unless alone in the engine; a number: vLLM's meaning, long
    past it and that many a step, alone or not, and as many prompt positions scored)."""
    if threshold is None:
        chunk = min(AUTO_CHUNK_TOKENS, budget)
        return {"long_prefill_token_threshold": budget, "long_prefill_chunk_tokens": chunk,
                "long_prefill_scored_tokens": min(AUTO_SCORED_TOKENS, chunk),
                "long_prefill_whole_alone": True}  # fmt: skip
    return {"long_prefill_token_threshold": threshold, "long_prefill_chunk_tokens": threshold,
            "long_prefill_scored_tokens": threshold}  # fmt: skip


class ShortArrivals:
    """When a prompt that is not long last arrived (by `clock`): a long prompt alone takes whole steps only once
    none came for SHORTS_QUIET_S."""

    def __init__(self, threshold: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold, self.clock = threshold, clock
        self._last = float("-inf")

    def saw(self, seq: Sequence) -> None:
        if seq.num_tokens <= self.threshold:
            self._last = self.clock()

    def quiet(self) -> bool:
        return self.clock() - self._last > SHORTS_QUIET_S


def long_past(seq: Sequence, threshold: int, scored_tokens: int) -> int:
    """The tokens left past which `seq` is long: the threshold, or for a prompt scored for its logprobs the positions
    a step scores (each of its rows costs a vocabulary projection more: a prompt that fits a step is still a heavy
    one)."""
    return (scored_tokens or threshold) if seq.scores_prompt else threshold


def short_prompt_waits(
    waiting: Iterable[Sequence], threshold: int, scored_tokens: int = 0, yielding_from: int | None = None
) -> bool:
    """Whether a prompt that is not long waits (threshold 0: no prompt is long, none is short either), of a class
    that does not yield: the step, if it can start it, is then its alone, the long and yielding prompts' chunks held
    for the next."""
    return threshold > 0 and any(
        seq.num_tokens - seq.num_computed_tokens <= long_past(seq, threshold, scored_tokens)
        and not yields(seq.priority, yielding_from)
        for seq in waiting
    )


def tokens_left(seq: Sequence, computed: int) -> int:
    """The tokens `seq` still has to compute when `computed` of its tokens are in the cache (proposals included)."""
    return seq.num_tokens - computed + len(seq.spec_token_ids)


class PrefillShares:
    """What one step lets each prefill take: built from the running sequences before the step, then asked about each
    sequence in scheduling order (`share`, then for a waiting one `has_seats`) and told what each took (`took`)."""

    def __init__(
        self,
        threshold: int = 0,
        max_partial: int = 1,
        max_long: int = 1,
        running: Iterable[Sequence] = (),
        context_scale: int = 0,
        shorts_first: bool = False,
        chunk_tokens: int = 0,
        scored_tokens: int = 0,
        alone: bool = False,
        yielding_from: int | None = None,
        yielding_tokens: int | None = None,
    ) -> None:
        """`threshold` 0: every prompt takes what the budget leaves it (the shares of a step that schedules
        nothing new); `context_scale` 0: chunks in plain tokens, however deep (vLLM's); `shorts_first`: a short
        prompt waits, and this step is its alone: long prompts' chunks wait for the next; `chunk_tokens`: a long
        prompt's tokens a step (0: the threshold's); `scored_tokens`: the prompt positions a step scores (0: the
        chunk's); `alone`: the one sequence in the engine, running or waiting: a long prompt's chunk is the budget;
        `yielding_from`: the classes from this priority on yield to a higher one this step (None: none does);
        `yielding_tokens`: the prompt tokens the yielding classes may compute this step between them (None: no
        limit)."""
        self.threshold, self.max_partial, self.max_long = threshold, max_partial, max_long
        self.context_scale, self.shorts_first, self.alone = context_scale, shorts_first, alone
        self.chunk_tokens = (chunk_tokens or threshold) if threshold else 0
        self.held_long = False  # whether a long prompt's chunk was held back for the short ones
        self.scored_tokens = (scored_tokens or self.chunk_tokens) if threshold else 0
        self.scored_left = self.scored_tokens or None  # prompt positions this step may still score; None: no limit
        self.yielding_from = yielding_from if threshold else None
        self.yielding_left = yielding_tokens if threshold else None  # what the yielding prompts may still compute
        self.yielding_spent = 0
        # The running prompts mid-prefill: each holds a seat, and a long one a long seat, until its prefill ends; a
        # yielding one none beside a higher class (its prefill goes at what it earns: a live prompt would wait on it).
        self._prefilling = [seq for seq in running if seq.num_tokens - seq.num_computed_tokens > 1
                            and not yields(seq.priority, self.yielding_from)]  # fmt: skip
        self._new_partial = self._new_long = 0  # seats taken this step by prompts admitted in it
        self._scheduled: dict[Sequence, int] = {}  # what each running prompt mid-prefill computes this step

    def is_long(self, seq: Sequence, left: int) -> bool:
        return self.threshold > 0 and long_past(seq, self.threshold, self.scored_tokens) < left

    def chunk(self, computed: int) -> int:
        """A long prompt's tokens in one step after `computed` of them: T at its start, fewer deeper in."""
        if not self.context_scale:
            return self.chunk_tokens
        return max(1, self.chunk_tokens * self.context_scale // (self.context_scale + computed))

    def share(self, seq: Sequence, computed: int, n: int) -> int:
        """`n` (what the budget leaves `seq`) cut to its share: a long prompt's chunk (and a started prefill's, so
        a long prompt's last chunk too), and no more prompt positions scored than the step has left. 0: nothing
        this step. For a sequence that scores its prompt, `computed` is its `num_computed_tokens` (its prefix is
        always recomputed for the logits)."""
        left = tokens_left(seq, computed)
        started = seq.status is SequenceStatus.RUNNING and seq.num_tokens - computed > 1
        if self.threshold and not self.alone and (started or self.is_long(seq, left)):
            chunk = self._piece(seq, computed, left)
            if self.shorts_first and left > chunk:  # a long prompt, short of its last chunk
                self.held_long = True
                return 0
            n = min(n, chunk)
        if self._yielding_prefill(seq, computed):
            if self.shorts_first and self.yielding_from is not None:  # a higher class's short prompt waits
                self.held_long = True
                return 0
            n = min(n, self.yielding_left)
        if self.scored_left is not None and seq.scores_prompt:
            scored = seq.prompt_scored_positions(n)
            if len(scored) > self.scored_left:  # the positions before the first still unscored cost no logits
                n = scored.start + self.scored_left - computed
        return n

    def _piece(self, seq: Sequence, computed: int, left: int) -> int:
        """A long prompt's tokens this step: its chunk (its scored share, if less), or all it has `left` when what
        would remain is a sliver, a quarter of the chunk or less (a step's fixed cost for a few tokens, and a step
        that looks like a decode)."""
        chunk = min(self.chunk(computed), self.scored_tokens) if seq.scores_prompt else self.chunk(computed)
        return left if left - chunk <= chunk // 4 else chunk

    def has_seats(self, seq: Sequence, computed: int, n: int) -> bool:
        """Whether the waiting `seq`, computing `n` tokens this step, gets the seats it needs: none when its prefill
        ends in this step, else a partial prefill's seat, and a long one's too when it is long."""
        left = tokens_left(seq, computed)
        if n >= left:
            return True
        if self._partial() >= self.max_partial:
            return False
        return not self.is_long(seq, left) or self._long() < self.max_long

    def took(self, seq: Sequence, n: int, admitted: bool) -> None:
        """`seq` computes `n` tokens this step (`admitted`: it starts in this step); before its counter moves."""
        if self.scored_left is not None and seq.scores_prompt:
            self.scored_left -= len(seq.prompt_scored_positions(n))
        if self._yielding_prefill(seq, seq.num_computed_tokens):
            self.yielding_left -= n
            self.yielding_spent += n
        left = tokens_left(seq, seq.num_computed_tokens)
        if not admitted:
            self._scheduled[seq] = n
        elif n < left and not yields(seq.priority, self.yielding_from):
            self._new_partial += 1
            self._new_long += self.is_long(seq, left)

    def held_back(self, waiting: Iterable[Sequence]) -> int:
        """How many of the `waiting` sequences (between steps) are long prompts that start only once a long prompt
        running now is through: they take none of the running batch's seats until then."""
        waiting_long = sum(self.is_long(seq, tokens_left(seq, seq.num_computed_tokens)) for seq in waiting)
        return max(0, waiting_long - max(0, self.max_long - self._long()))

    def _yielding_prefill(self, seq: Sequence, computed: int) -> bool:
        """Whether `seq` computes its prompt (not its next token), of a class that yields."""
        return self.yielding_left is not None and seq.num_tokens - computed > 1 and seq.priority >= YIELDING_PRIORITY

    def _partial(self) -> int:
        """Prompts whose prefill goes on past this step: a running one whose last chunk is in it frees its seat."""
        going_on = sum(tokens_left(s, s.num_computed_tokens) > self._scheduled.get(s, 0) for s in self._prefilling)
        return going_on + self._new_partial

    def _long(self) -> int:
        """Long prompts prefilling: those admitted in this step, and the running ones whose next chunk is not
        their last (a long prompt holds its seat to its last chunk, however deep in it that is)."""
        going_on = 0
        for s in self._prefilling:
            left = tokens_left(s, s.num_computed_tokens)
            going_on += left > self._piece(s, s.num_computed_tokens, left)
        return going_on + self._new_long
