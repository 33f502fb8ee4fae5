"""The n-gram proposer's lookups and the budget that decides which proposals a step verifies."""

from __future__ import annotations

import pytest

from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.speculative.budget import SpecBudget
from sagellm.runtime.engine.speculative.config import parse_speculative_config
from sagellm.runtime.engine.speculative.proposers import PROPOSERS, NgramProposer


def ngram(k: int = 3, low: int = 2, high: int = 3) -> NgramProposer:
    config = parse_speculative_config(
        {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": low, "prompt_lookup_max": high}
    )
    return PROPOSERS.get("ngram")(config)


@pytest.mark.parametrize(
    ("tokens", "k", "guess"),
    [
        ([1, 2, 3, 4, 5, 9, 9, 2, 3], 3, [4, 5, 9]),  # "2 3" recurs: what followed it
        ([1, 2, 3, 4, 5, 2, 3, 4, 7, 7, 3, 4], 3, [7, 7, 3]),  # two earlier "3 4": the latest followed by k tokens
        ([1, 2, 3, 9, 8, 2, 3, 5, 0, 1, 2, 3], 2, [9, 8]),  # "1 2 3" (the longest) beats the later "2 3"
        ([1, 2, 3, 4, 2, 3], 3, [4, 2, 3]),  # followed by k tokens
        ([1, 2, 3, 4, 5, 6], 3, []),  # the suffix never recurs
        ([4, 4], 3, []),  # too short to look up a 2-gram before the suffix
        ([1, 2, 3, 4, 2, 3], 1, [4]),
    ],
)
def test_prompt_lookup_guesses_what_followed_the_suffix_before(tokens, k, guess):
    assert ngram(k).propose(tokens, k) == guess


def test_a_repeating_run_guesses_as_far_as_it_can():
    assert ngram(4, 1, 2).propose([7, 5, 5, 5, 5, 5, 5], 4) == [5, 5, 5, 5]


def test_a_one_token_minimum_matches_a_single_recurring_token():
    assert ngram(2, 1, 3).propose([8, 6, 1, 9, 6], 2) == [1, 9]
    assert ngram(2, 2, 3).propose([8, 6, 1, 9, 6], 2) == []


def test_nothing_is_proposed_for_no_room():
    assert ngram().propose([1, 2, 3, 1, 2], 0) == []


def _seq(name: str) -> Sequence:
    return Sequence(name, [1, 2, 3], SamplingParams())


def test_the_budget_verifies_everything_while_rows_look_free():
    budget = SpecBudget()
    seqs = [_seq(str(i)) for i in range(4)]
    proposals = {s: [1, 2, 3, 4] for s in seqs}
    budget.choose(proposals, step_tokens=4, sampled=4)
    assert all(len(d) == 4 for d in proposals.values())


def test_costly_rows_keep_only_the_proposals_that_pay_for_them():
    budget = SpecBudget()
    for _ in range(200):  # a step costs 10 ms plus 1 ms a row: rows are dear at a batch of sixteen
        for rows in (16, 32, 48):
            budget.step_took(rows, 0.010 + 0.001 * rows)
    a, b = budget.line()
    assert a == pytest.approx(0.010, rel=0.05) and b == pytest.approx(0.001, rel=0.05)
    good, poor = _seq("good"), _seq("poor")
    for _ in range(50):
        budget.verified(good, 4, 4)  # accepts everything it is offered
        budget.verified(poor, 4, 0)
    others = {_seq(str(i)): [] for i in range(14)}
    proposals = {good: [1, 2, 3, 4], poor: [1, 2, 3, 4], **others}
    budget.choose(proposals, step_tokens=16, sampled=16)
    assert len(proposals[good]) == 4 and proposals[poor] == []


def test_at_one_sequence_a_cheap_row_pays_even_for_a_modest_acceptance():
    budget = SpecBudget()
    for _ in range(200):  # 20 ms a step whatever its rows, 0.2 ms a row: a small model's decode on a CPU
        for rows in (1, 3, 5):
            budget.step_took(rows, 0.020 + 0.0002 * rows)
    seq = _seq("one")
    for _ in range(50):
        budget.verified(seq, 4, 1)
    proposals = {seq: [1, 2, 3, 4]}
    budget.choose(proposals, step_tokens=1, sampled=1)
    assert len(proposals[seq]) >= 2
