"""Sources and sinks on real files, a real pipe and text streams: every bad input line becomes an error item that
names FILE:LINE, ids stay unique, and the stdout sink never interleaves concurrent replies."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from sagellm.operators.sinks import JsonlSink, StdoutSink
from sagellm.operators.sources import JsonlSource, PromptSource, StdinSource, decode_request_line
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.outputs import RequestMetrics, TokenLogprob
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.pipeline.messages import Request, RequestError, TokenDelta
from sagellm.runtime.pipeline.operator import OperatorContext, get_operator, parameter_types
from sagellm.runtime.pipeline.served_model import GIVEN, ServedModel

NOW = 1000.0


def _drain(source) -> list:
    items = []
    while (batch := source.poll()) is not None:
        items.extend(batch)
    return items


MODEL_DEFAULTS = {"temperature": 0.2, "max_tokens": 100}  # what the graph's model recommends (its generation config)


def test_prompt_source_releases_all_requests_once_with_unique_ids():
    source = get_operator("prompt_source")(prompts=["a", "b", "c"], max_tokens=8, seed=3, priority=2, user="u")
    source.clock = lambda: NOW
    source.open(OperatorContext(node_id="src", graph_attrs={GIVEN: ServedModel("m", None, None, MODEL_DEFAULTS)}))
    first = source.poll()
    assert source.poll() is None
    assert [r.request_id for r in first] == ["req-0", "req-1", "req-2"]
    assert [r.messages for r in first] == [[{"role": "user", "content": p}] for p in "abc"]  # chat by default
    assert [r.prompt for r in PromptSource(prompts=["raw"], chat=False).poll()] == ["raw"]
    r = first[0]
    assert (r.sampling.max_tokens, r.sampling.temperature, r.sampling.seed, r.priority, r.user) == (8, 0.2, 3, 2, "u")
    assert PromptSource(prompts=["x"]).poll()[0].sampling == SamplingParams()  # no model's defaults: the class's
    assert r.arrival_time == NOW
    assert first[0].sampling is not first[1].sampling
    assert [r.request_id for r in PromptSource(prompts=["x"], id_prefix="b-").poll()] == ["b-0"]
    with pytest.raises(ValueError, match="temperature"):
        PromptSource(prompts=["x"], temperature=-1.0)
    assert PromptSource().poll() == []


def test_source_parameters_are_typed_and_hide_injected_clock_and_stream():
    assert set(parameter_types(JsonlSource)) == {"path", "max_tokens", "temperature", "id_prefix"}
    assert parameter_types(JsonlSource)["path"] == (str, True)
    assert set(parameter_types(StdinSource)) == {"max_tokens", "temperature", "id_prefix"}
    assert StdinSource.blocking and not JsonlSource.blocking


def test_jsonl_source_parses_requests_and_turns_bad_lines_into_errors(tmp_path: Path):
    lines = [
        {"prompt": "hello", "max_tokens": 4, "temperature": 0.7, "top_k": 5, "stop": "\n", "priority": 1},
        {"prompt_token_ids": [1, 2, 3], "request_id": "mine", "ttft_slo_ms": 200, "deadline_s": 30, "seed": 7},
        "",  # blank: skipped, still counted in line numbers
        "{not json",
        {"prompt": "x", "max_token": 3},  # typo: unknown field
        {"prompt": "x", "max_tokens": "three"},
        {"prompt": "x", "temperature": -0.5},  # SamplingParams range error
        {"prompt": "x", "prompt_token_ids": [1]},
        {"request_id": "no-prompt"},
        {"prompt": "again", "request_id": "mine"},  # duplicate id
        {"prompt": "takes req-9", "request_id": "req-9"},
        {"prompt": "plain", "user": "alice", "cost_budget": 0.5, "logprobs": 2, "ignore_eos": True},
        {"prompt": "yes or no?", "guided": {"choice": ["yes", "no"]}},
        {"prompt": "x", "guided": {"choice": ["yes"], "regex": "no"}},
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    source = JsonlSource(path=str(path), max_tokens=32)
    source.clock = lambda: NOW
    source.chunk_lines = 5
    source.open(OperatorContext(node_id="src", graph_attrs={GIVEN: ServedModel("m", None, None, MODEL_DEFAULTS)}))
    first = source.poll()
    assert len(first) == 4  # five lines read, one of them blank: lazy, chunk by chunk
    items = first + _drain(source)
    source.close()

    by_line = dict(zip([1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], items))
    hello, mine = by_line[1], by_line[2]
    assert isinstance(hello, Request) and hello.prompt == "hello" and hello.priority == 1
    assert (hello.sampling.max_tokens, hello.sampling.temperature, hello.sampling.top_k) == (4, 0.7, 5)
    assert hello.sampling.stop == ["\n"] and hello.arrival_time == NOW
    assert mine.request_id == "mine" and mine.prompt_token_ids == [1, 2, 3] and mine.prompt is None
    assert mine.sampling.max_tokens == 32 and mine.sampling.temperature == 0.2  # the source's, then the model's
    assert (mine.ttft_slo_ms, mine.deadline, mine.sampling.seed) == (200.0, NOW + 30, 7)
    plain = by_line[12]
    assert (plain.user, plain.cost_budget, plain.sampling.logprobs, plain.sampling.ignore_eos) == (
        "alice",
        0.5,
        2,
        True,
    )
    assert by_line[11].request_id == "req-9"
    assert by_line[13].sampling.guided == GuidedDecoding(choice=["yes", "no"])

    expected = {4: "malformed", 5: "unknown field `max_token`", 6: "$.max_tokens", 7: "temperature must be >= 0",
                8: "exactly one of", 9: "exactly one of", 10: "'mine' was already used",
                14: "exactly one of json, json_object, regex, choice, grammar"}  # fmt: skip
    for line_no, why in expected.items():
        error = by_line[line_no]
        assert isinstance(error, RequestError) and error.code == "invalid_request", line_no
        assert error.message.startswith(f"{path}:{line_no}: ") and why in error.message, error.message
    ids = [item.request_id for item in items]
    assert len(set(ids)) == len(ids)
    assert "req-9" not in [item.request_id for item in items[:-4]]  # generated ids skip the one a line named


def test_stdin_source_reads_plain_text_and_json_lines_from_a_stream():
    source = StdinSource(max_tokens=5)
    source.stream = io.StringIO('tell me a joke\n\n{"prompt": "json one", "max_tokens": 2}\n{oops\n  spaced  \n')
    source.open(OperatorContext(node_id="stdin"))
    items = _drain(source)
    assert [type(i) for i in items] == [Request, Request, RequestError, Request]
    assert items[0].prompt == "tell me a joke" and items[0].sampling.max_tokens == 5
    assert items[1].prompt == "json one" and items[1].sampling.max_tokens == 2
    assert items[2].message.startswith("<stdin>:4: ")
    assert items[3].prompt == "  spaced  "
    assert [i.request_id for i in items] == ["req-0", "req-1", "req-2", "req-3"]


def test_stdin_source_reads_a_real_pipe_one_line_per_poll():
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w") as writer:
        writer.write("first\nsecond\n")
    source = StdinSource()
    with os.fdopen(read_fd) as reader:
        source.stream = reader
        source.open(OperatorContext(node_id="stdin"))
        assert [r.prompt for r in source.poll()] == ["first"]
        assert [r.prompt for r in source.poll()] == ["second"]
        assert source.poll() is None


def _delta(rid: str, text: str, finish: str | None = None, **kw) -> TokenDelta:
    return TokenDelta(request_id=rid, token_ids=[len(text)], text=text, finish_reason=finish, time=NOW, **kw)


def test_stdout_sink_streams_the_earliest_request_live_and_the_others_in_turn():
    out = io.StringIO()
    sink = get_operator("stdout_sink")()
    sink.stream = out
    steps = [
        (_delta("a", "A1 "), "A1 "),  # a is the head: live
        (_delta("b", "B1 "), "A1 "),  # b waits behind a
        (_delta("c", "C1 "), "A1 "),
        (_delta("b", "B2", "stop"), "A1 "),  # b ends while still waiting
        (_delta("a", "A2 "), "A1 A2 "),
        (RequestError(request_id="c", code="timeout", message="too slow"), "A1 A2 "),
        (_delta("a", "A3", "length"), "A1 A2 A3\nB1 B2\nC1 \n[c] error timeout: too slow\n"),
        (_delta("d", "D1", "stop"), "A1 A2 A3\nB1 B2\nC1 \n[c] error timeout: too slow\nD1\n"),
    ]
    for item, expected in steps:
        assert sink.execute(item) is None
        assert out.getvalue() == expected


def test_stdout_sink_ids_errors_and_close_flushes_unfinished_replies():
    out = io.StringIO()
    sink = StdoutSink(show_ids=True)
    sink.stream = out
    sink.execute(RequestError(request_id="r0", code="invalid_request", message="bad line"))
    sink.execute(_delta("r1", "hel"))
    sink.execute(_delta("r2", "queued"))
    sink.execute(_delta("r1", "lo", "stop"))
    sink.execute(_delta("r3", "cut"))
    sink.close()
    assert out.getvalue() == "[r0] error invalid_request: bad line\n[r1] hello\n[r2] queued\n[r3] cut\n"


def test_jsonl_sink_writes_one_line_per_finished_request(tmp_path: Path):
    path = tmp_path / "out" / "replies.jsonl"
    sink = JsonlSink(path=str(path))
    sink.open(OperatorContext(node_id="sink"))
    metrics = RequestMetrics(
        arrival_time=1.0,
        first_token_time=1.1,
        finished_time=1.5,
        num_prompt_tokens=3,
        num_output_tokens=3,
        slo_met=True,
    )
    sink.execute(_delta("a", "Hel"))
    sink.execute(_delta("b", "x"))
    sink.execute(_delta("a", "lo", "stop", metrics=metrics))
    assert json.loads(path.read_text())["request_id"] == "a"  # flushed as soon as the request ended
    sink.execute(RequestError(request_id="b", code="instance_lost", message="engine died", retryable=True))
    sink.close()
    a, b = (json.loads(line) for line in path.read_text().splitlines())
    assert a == {
        "request_id": "a", "text": "Hello", "token_ids": [3, 2], "finish_reason": "stop",
        "metrics": {"arrival_time": 1.0, "first_scheduled_time": None, "first_token_time": 1.1, "finished_time": 1.5,
                    "num_prompt_tokens": 3, "num_output_tokens": 3, "num_cached_tokens": 0, "num_preemptions": 0,
                    "slo_met": True, "kv_handover_s": None, "cached_tokens_by_tier": None, "queue_s": None,
                    "ttft_s": pytest.approx(0.1),
                    "tpot_s": pytest.approx(0.2), "e2e_s": 0.5},
    }  # fmt: skip
    assert b == {
        "request_id": "b", "text": "x", "token_ids": [1],
        "error": {"code": "instance_lost", "message": "engine died", "retryable": True},
    }  # fmt: skip


def test_jsonl_sink_writes_the_logprobs_a_request_asked_for(tmp_path: Path):
    path = tmp_path / "replies.jsonl"
    sink = JsonlSink(path=str(path))
    sink.open(OperatorContext(node_id="sink"))
    prompt = [None, TokenLogprob(token_id=7, logprob=-2.5, top=[(9, -0.5)], rank=3)]
    sink.execute(_delta("a", "Hi", logprobs=[TokenLogprob(token_id=2, logprob=-0.1)], prompt_logprobs=prompt))
    sink.execute(_delta("a", "!", "stop", logprobs=[TokenLogprob(token_id=1, logprob=-0.2, top=[(1, -0.2)])]))
    sink.close()
    record = json.loads(path.read_text())
    assert record["logprobs"] == [
        {"token_id": 2, "logprob": -0.1, "top": []},
        {"token_id": 1, "logprob": -0.2, "top": [[1, -0.2]]},
    ]
    assert record["prompt_logprobs"] == [None, {"token_id": 7, "logprob": -2.5, "top": [[9, -0.5]], "rank": 3}]


def test_a_request_line_takes_penalties_and_biases_and_names_a_bad_one():
    line = {"prompt": "hi", "repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.2,
            "logit_bias": {"5": 2.0}, "min_tokens": 2, "bad_words": ["x"], "allowed_token_ids": [1, 2, 3]}  # fmt: skip
    sampling = decode_request_line(json.dumps(line), new_id=lambda: "a", defaults={}, now=0.0).sampling
    assert (sampling.repetition_penalty, sampling.presence_penalty, sampling.frequency_penalty) == (1.3, 0.5, 0.2)
    assert (sampling.logit_bias, sampling.min_tokens, sampling.bad_words) == ({5: 2.0}, 2, ["x"])
    assert sampling.allowed_token_ids == [1, 2, 3]
    with pytest.raises(ValueError, match="presence_penalty"):
        decode_request_line('{"prompt": "hi", "presence_penalty": 3}', new_id=lambda: "a", defaults={}, now=0.0)
