"""The request ledger: exactly one end per request, whatever arrives after it, and cancels remembered for requests
that only pass through a worker."""

from __future__ import annotations

import structlog.testing

from sagellm.runtime.executor.ledger import RequestLedger
from sagellm.runtime.pipeline.messages import RequestError, TokenDelta


def test_a_second_end_is_dropped_and_a_late_one_after_instance_lost_is_expected():
    ledger = RequestLedger(keep_outcomes=False)
    for rid in ("a", "b"):
        ledger.entered(rid)
    lost = RequestError(request_id="a", code="instance_lost", message="worker gone", retryable=True)
    assert ledger.observe(lost)
    assert ledger.observe(TokenDelta(request_id="b", token_ids=[1], finish_reason="length"))
    with structlog.testing.capture_logs() as logs:
        assert not ledger.observe(TokenDelta(request_id="a", token_ids=[2], finish_reason="length"))  # lived on
        assert not ledger.observe(TokenDelta(request_id="b", token_ids=[], finish_reason="abort"))  # a bug
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("late_item_dropped", "debug"), ("duplicate_terminal_dropped", "error")]  # fmt: skip
    assert (ledger.load.failed, ledger.load.completed, ledger.load.in_flight) == (1, 1, 0)


def test_a_passing_cancel_is_remembered_until_an_engine_aborts_it():
    ledger = RequestLedger()
    ledger.cancel("x")  # not entered here, not passing: nothing to remember
    assert not ledger.is_cancelled("x")
    ledger.cancel("x", passing=True)
    assert ledger.is_cancelled("x") and ledger.any_cancelled
    ledger.aborted("x")
    assert not ledger.is_cancelled("x") and not ledger.any_cancelled


def test_first_tokens_are_timed_as_they_arrive_and_the_oldest_waiting_request_is_known():
    ledger = RequestLedger(keep_outcomes=False)
    for rid, arrival in (("a", 100.0), ("b", 101.0), ("c", 102.0), ("retry", None)):
        ledger.entered(rid, arrival)
    assert ledger.load.oldest_waiting == 100.0
    ledger.observe(TokenDelta(request_id="b", token_ids=[7], text="x", time=101.5))
    ledger.observe(TokenDelta(request_id="b", token_ids=[8], text="y", time=109.0))  # not its first: not timed
    assert ledger.load.oldest_waiting == 100.0
    ledger.observe(RequestError(request_id="a", code="invalid_request", message="no", time=103.0))  # no token
    ledger.observe(TokenDelta(request_id="retry", token_ids=[1], time=104.0))  # entered without an arrival time
    assert ledger.load.oldest_waiting == 102.0
    ledger.observe(TokenDelta(request_id="c", token_ids=[9], finish_reason="length", time=102.25))
    assert ledger.load.oldest_waiting is None
    assert ledger.load.ttfts_seen == 2 and list(ledger.load.recent_ttfts) == [0.5, 0.25]
