"""The faults report's own arithmetic: a run's summary against the reference run, the retries it reads from the
gateway's metrics, the table."""

from __future__ import annotations

from sagellm.benchmarks.faults import Stream, _resumed, _summary, markdown


def test_a_run_is_summed_up_against_the_reference():
    reference = [Stream("abc", ["length"], 0.1, 2.0), Stream("def", ["length"], 0.1, 2.0)]
    faulted = [Stream("abc", ["length"], 0.1, 5.5), Stream("de", ["instance_lost"], 0.1, 1.0)]
    run = _summary("kill", faulted, reference, resumed=1, recovery=12.34)
    assert (run.completed, run.failed, run.lost, run.same_text) == (1, "instance_lost ×1", 0, 1)
    assert (run.e2e_p50_s, run.most_added_s, run.recovery_s) == (5.5, 3.5, 12.3)
    lost = _summary("kill", [Stream("", [], None, 9.0), Stream("x", ["length", "length"])], reference, 0, None)
    assert lost.lost == 2 and lost.completed == 0
    assert _summary("no fault", reference, None, 0, None).same_text is None


def test_resumed_retries_are_read_from_the_metrics():
    metrics = (
        'sagellm:request_retries_total{code="instance_lost",resumed="true"} 5.0\n'
        'sagellm:request_retries_total{code="unavailable",resumed="false"} 2.0\n'
        'sagellm:request_retries_total{code="timeout",resumed="true"} 1.0\n'
    )
    assert _resumed(metrics) == 6 and _resumed("") == 0


def test_the_table_has_a_row_per_run():
    run = _summary("kill", [Stream("abc", ["length"], 0.1, 3.0)], [Stream("abc", ["length"], 0.1, 2.0)], 1, 9.96)
    assert markdown([run]).splitlines()[-1] == "| kill | 1/1 | none | 0 | 1 | 1/1 | 3.0 / 3.0 | 1.0 | 10.0 |"
