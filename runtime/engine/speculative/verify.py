"""Checking proposed tokens against the target model.

A step computes a speculating sequence's last token and its k proposed ones, so it has k + 1 rows of logits: row i
is what the model says follows the sequence and the first i proposals. Each row draws its token exactly as plain
decoding would at that position (greedy: the argmax; sampled: the row's own seeded draw, its penalties counting the
proposals before it), and proposals are kept while they equal those draws; the first draw that differs, or the one
after the last proposal, is kept too. Proposals here are point guesses (a lookup, a greedy draft), for which
rejection sampling's test, accept x with probability min(1, p(x) / q(x)) with q(x) = 1, accepts with probability
p(x): the chance that the target's own draw is x. So the tokens are distributed as the target model's, and with a
seed they are the very tokens plain decoding draws, speculation on or off."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sagellm.runtime.engine.penalties import BadWords
from sagellm.runtime.engine.sampler import make_generator, seed_at
from sagellm.runtime.engine.sequence import Sequence


@dataclass
class DraftedHistory:
    """A sequence as if its first proposals were accepted: what the penalties of a later proposal's row read."""

    seq: Sequence
    drafts: list[int]

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.drafts

    @property
    def output_start(self) -> int:
        return self.seq.output_start

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + len(self.drafts)

    @property
    def bad_words(self) -> BadWords | None:
        return self.seq.bad_words


@dataclass
class SampledRows:
    """The rows a step samples, one per sampled position: the sampler's per-row arguments."""

    params: list
    generators: list[torch.Generator | None]
    histories: list


def sampled_rows(seqs: list[Sequence]) -> SampledRows:
    """Each sequence's rows in order: its next token's, then one per proposal, each seeded for its own position."""
    rows = SampledRows([], [], [])
    for seq in seqs:
        seed = seq.params.seed
        for i in range(1 + len(seq.spec_token_ids)):
            generator = seq.generator if i == 0 else make_generator(seed)
            if generator is not None:
                seed_at(generator, seed, seq.num_tokens + i)  # the position of the token this row draws
            rows.params.append(seq.params)
            rows.generators.append(generator)
            rows.histories.append(seq if i == 0 else DraftedHistory(seq, seq.spec_token_ids[:i]))
    return rows


def accepted_tokens(drafts: list[int], drawn: list[int]) -> int:
    """How many of the `drafts` the target's draws (`drawn`, one more than the drafts) confirm, in order."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == drawn[accepted]:
        accepted += 1
    return accepted


@dataclass
class SpecDecodeStats:
    """Counters since the engine started, under vLLM's metric names: verification rounds with proposals, tokens
    proposed, tokens accepted (acceptance rate = accepted / draft tokens)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def count(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
