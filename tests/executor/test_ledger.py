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
