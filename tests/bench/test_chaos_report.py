"""The chaos report's own arithmetic: reading a stream's end, counting lost requests, the table."""

from __future__ import annotations

from sagellm.benchmarks.chaos_report import Row, lost_count, markdown, status_of
from sagellm.benchmarks.chaos_streams import stream_event


def test_a_stream_line_says_its_end_and_whether_it_carries_a_token():
    assert stream_event('data: {"choices": [{"text": "a", "finish_reason": null}]}') == (None, True)
    assert stream_event('data: {"choices": [{"text": "", "finish_reason": "length"}]}') == ("length", True)
    assert stream_event('data: {"error": {"code": "instance_lost", "message": "gone"}}') == ("instance_lost", False)
    assert stream_event("data: [DONE]") == (None, False) and stream_event("") == (None, False)


def test_lost_means_no_end_two_ends_or_an_unclear_one():
    ok = {"length", "instance_lost"}
    assert lost_count([["length"], ["instance_lost"], ["503 instance_lost"]], ok) == 0
    assert lost_count([[], ["length", "length"], ["transport ReadTimeout"]], ok) == 3
    assert [status_of(e) for e in (["length"], ["429 overloaded"], ["transport X"], [])] == [
        "200", "429", "transport X", "0 ends"]  # fmt: skip


def test_the_table_has_a_row_per_phase():
    table = markdown([Row("kill -9 decode", "32 streams", "length ×32", recovery_s=12.94)])
    assert table.splitlines()[-1] == "| kill -9 decode | 32 streams | length ×32 | 0 | 0 | 12.9 |"
