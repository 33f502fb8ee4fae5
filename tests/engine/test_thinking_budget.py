"""A thinking budget in the engine: a reply that starts inside its thinking thinks `budget` tokens, then the closing
tokens are forced and the answer follows; a reply that never opens its thinking is what it is without a budget; a
resumed request counts the thinking it already did."""

from __future__ import annotations

import pytest

from sagellm import LLM, SamplingParams
from sagellm.common.errors import FieldError
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.thinking import ThinkingBudget, ThinkingTracker
from tests.oracle import run_to_end
from tests.tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    return LLM(str(make_tiny_llama(tmp_path_factory.mktemp("thinking") / "tiny")), max_num_seqs=4)


def _budget(llm: LLM, budget: int, inside: bool) -> ThinkingBudget:
    closing = llm.engine.tokenizer.encode("\n</think>\n\n", add_special_tokens=False)
    return ThinkingBudget(budget, closing, starts_inside=inside)


@pytest.mark.parametrize("budget", [0, 1, 5])
def test_thinking_is_closed_after_its_budget_and_the_answer_follows(llm, budget) -> None:
    spec = _budget(llm, budget, inside=True)
    params = SamplingParams(max_tokens=budget + len(spec.close_token_ids) + 6, temperature=0, ignore_eos=True,
                            thinking=spec)  # fmt: skip
    out = llm.generate(["Think about it."], params)[0].outputs[0]
    assert out.token_ids[budget : budget + len(spec.close_token_ids)] == spec.close_token_ids
    thought = llm.engine.tokenizer.decode(out.token_ids[:budget])
    assert "</think>" not in thought and "</think>" in out.text
    assert len(out.token_ids) == params.max_tokens  # the answer goes on after the forced closing


def test_a_reply_that_does_not_think_is_unchanged(llm) -> None:
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    plain = llm.generate(["Hello there."], params)[0].outputs[0].token_ids
    budgeted = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, thinking=_budget(llm, 2, inside=False))
    assert llm.generate(["Hello there."], budgeted)[0].outputs[0].token_ids == plain


def test_a_resumed_request_counts_the_thinking_it_already_did(llm) -> None:
    """Failover resumes a request with its output so far at the end of its prompt: the budget goes on from there,
    and greedy tokens are the uninterrupted run's."""
    spec = _budget(llm, 5, inside=True)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, thinking=spec)
    prompt = llm.engine.tokenizer.encode("Think about it.")
    whole = llm.generate([prompt], params)[0].outputs[0].token_ids
    engine = llm.engine
    resumed = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, thinking=spec)
    engine.add_request("resumed", prompt + whole[:3], resumed, resumed_tokens=3)
    assert run_to_end(engine)["resumed"] == whole[3:]


def test_the_tracker_reads_tags_by_text() -> None:
    spec = ThinkingBudget(3, [7, 8], starts_inside=False)
    tracker = ThinkingTracker(spec)
    for token, text in [(1, " <th"), (2, "ink>"), (3, "a"), (4, "b")]:
        tracker.accept(token, text)
    assert tracker.inside and tracker.thought == 2 and not tracker.forcing
    tracker.accept(5, "c")
    assert tracker.forcing == [7, 8]
    tracker.accept(7, "</")
    tracker.accept(8, "think>")
    assert tracker.done and not tracker.forcing
    closed = ThinkingTracker(ThinkingBudget(3, [7], starts_inside=True))
    closed.accept(1, "x</think>")
    assert closed.done and closed.thought == 0


def test_a_budget_is_refused_with_a_constrained_reply_or_when_malformed() -> None:
    with pytest.raises(FieldError, match="constrained output"):
        SamplingParams(thinking=ThinkingBudget(2, [1]), guided=GuidedDecoding(regex="a+"))
    with pytest.raises(FieldError, match=">= 0"):
        ThinkingBudget(-1, [1])
    with pytest.raises(FieldError, match="tokens that close it"):
        ThinkingBudget(2, [])
