"""The trace generators: seeded, vectorised, of the shape they promise; from_rows keeps what it is given."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sagellm.simulator.traces import azure, bursty, from_rows, named, poisson, with_classes


def test_generators_are_seeded_and_fast() -> None:
    started = time.perf_counter()
    big = poisson(1_000_000, 100.0, seed=3)
    assert time.perf_counter() - started < 2.0  # well under a second on an idle machine
    again = poisson(1_000_000, 100.0, seed=3)
    assert np.array_equal(big.arrivals, again.arrivals) and np.array_equal(big.prompt_tokens, again.prompt_tokens)
    assert not np.array_equal(big.arrivals, poisson(1_000_000, 100.0, seed=4).arrivals)
    assert big.rate == pytest.approx(100.0, rel=0.01)


def test_bursty_is_burstier_than_poisson_at_the_same_rate() -> None:
    def cv(arrivals: np.ndarray) -> float:
        gaps = np.diff(arrivals)
        return float(gaps.std() / gaps.mean())

    assert cv(poisson(100_000, 10.0).arrivals) == pytest.approx(1.0, abs=0.05)
    trace = bursty(100_000, 10.0, cv=4.0)
    assert cv(trace.arrivals) == pytest.approx(4.0, rel=0.1)
    assert trace.rate == pytest.approx(10.0, rel=0.1)
    with pytest.raises(ValueError, match="cv must be > 1"):
        bursty(10, 1.0, cv=1.0)


def test_azure_shapes_follow_the_published_medians() -> None:
    code, conversation = azure(50_000, kind="code"), azure(50_000, kind="conversation")
    assert np.median(code.prompt_tokens) == pytest.approx(1500, rel=0.05)
    assert np.median(code.output_tokens) == pytest.approx(13, rel=0.1)
    assert np.median(conversation.prompt_tokens) == pytest.approx(1020, rel=0.05)
    assert np.median(conversation.output_tokens) == pytest.approx(129, rel=0.05)
    assert code.rate == pytest.approx(2.6, rel=0.1) and conversation.rate == pytest.approx(5.6, rel=0.1)
    assert named("azure-conv", 10, 1.0).name == "azure-conversation"
    with pytest.raises(ValueError, match="kind must be one of"):
        azure(10, kind="chat")


def test_at_rate_stretches_time_only() -> None:
    trace = poisson(1000, 5.0, seed=1)
    faster = trace.at_rate(50.0)
    assert faster.rate == pytest.approx(50.0)
    assert np.array_equal(faster.prompt_tokens, trace.prompt_tokens)


def test_from_rows_keeps_order_and_checks() -> None:
    trace = from_rows([0.0, 0.0, 1.5], [10, 20, 30], [1, 2, 3], name="engine run")
    assert trace.prompt_tokens.tolist() == [10, 20, 30] and trace.priorities is None
    classed = with_classes(trace, [(0.5, 0, 1000.0), (0.5, 2, 20000.0)], seed=1)
    assert set(classed.priorities.tolist()) <= {0, 2} and classed.ttft_slo_ms is not None
    with pytest.raises(ValueError, match="sorted"):
        from_rows([1.0, 0.5], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="2 prompt_tokens for 3 arrivals"):
        from_rows([0.0, 1.0, 2.0], [1, 1], [1, 1, 1])
    with pytest.raises(ValueError, match="output_tokens >= 1"):
        from_rows([0.0], [5], [0])
