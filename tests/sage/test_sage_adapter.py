"""sageLLM operators inside SAGE (`isage`): the builders make real SAGE classes, keep the operator contract
(pass-through, errors as items, one terminal item per request), and a SAGE LocalEnvironment runs a small pipeline of
test operators end to end: source -> admission -> engine service -> sink. No model: the engine echoes prompts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import msgspec
import pytest
from sage.foundation import FlatMapFunction, MapFunction, SinkFunction, SourceFunction
from sage.runtime import BaseService, LocalEnvironment

from sagellm.runtime.pipeline.messages import Request, RequestError, TokenDelta, is_terminal
from sagellm.runtime.pipeline.operator import (
    MapOperator,
    OperatorError,
    SourceOperator,
    StepOperator,
    register_operator,
)
from sagellm.sage import engine_caller, sage_function, sage_service

EVENTS: list[str] = []  # open/close calls, in order
COLLECTED: list[object] = []  # what the sink operator received


@register_operator
class PromptSource(SourceOperator):
    """Emits one Request per prompt, `batch` per poll, with an empty poll in between (SAGE's idle case)."""

    name = "test_sage_source"

    def __init__(self, prompts: tuple[str, ...] = (), batch: int = 2) -> None:
        self.prompts = list(prompts)
        self.batch = batch
        self.polls = 0
        self.sent = 0

    def poll(self) -> list[Request] | None:
        self.polls += 1
        if not self.prompts:
            return None
        if self.polls % 2 == 0:
            return []
        taken, self.prompts = self.prompts[: self.batch], self.prompts[self.batch :]
        self.sent += len(taken)
        return [Request(request_id=f"r{self.sent - len(taken) + i}-{p}", prompt=p) for i, p in enumerate(taken)]


@register_operator
class Admit(MapOperator):
    """Tokenizes by character; rejects an empty prompt as an item and raises (a bug) on "boom"."""

    name = "test_sage_admit"
    accepts = (Request,)

    def __init__(self, max_chars: int = 64) -> None:
        self.max_chars = max_chars

    def execute(self, item: Request) -> Request | RequestError:
        if item.prompt == "boom":
            raise ValueError("boom")
        if not item.prompt or len(item.prompt) > self.max_chars:
            return RequestError(request_id=item.request_id, code="invalid_request", message="bad prompt length")
        return msgspec.structs.replace(item, prompt_token_ids=[ord(c) for c in item.prompt])


@register_operator
class Split(MapOperator):
    """Returns a list: one item per character, to check flat=True."""

    name = "test_sage_split"

    def execute(self, item: str) -> list[str]:
        return list(item)


@register_operator
class EchoEngine(StepOperator):
    """Step-driven like a real engine: each step emits the next prompt token of every running request; a "!" token
    makes the step raise, as a broken engine would."""

    name = "test_sage_echo_engine"
    accepts = (Request,)

    def __init__(self, max_running: int = 4) -> None:
        self.max_running = max_running
        self.running: dict[str, list[int]] = {}
        self.peak = 0  # most requests one step served
        self.before_step: Callable[[], object] | None = None  # a test's hook, run once before the first step

    def open(self, ctx) -> None:
        super().open(ctx)
        EVENTS.append(f"open {ctx.node_id}")

    def close(self) -> None:
        EVENTS.append("close engine")

    def add(self, item: Request) -> list[RequestError]:
        if len(self.running) >= self.max_running:
            return [RequestError(request_id=item.request_id, code="overloaded", message="full")]
        self.running[item.request_id] = list(item.prompt_token_ids or [])
        return []

    def step(self) -> list[TokenDelta]:
        if self.before_step is not None:
            self.before_step()
            self.before_step = None
        self.peak = max(self.peak, len(self.running))
        out = []
        for rid, left in list(self.running.items()):
            if left[0] == ord("!"):
                raise RuntimeError("bad token")
            token = left.pop(0)
            out.append(TokenDelta(request_id=rid, token_ids=[token], finish_reason=None if left else "stop"))
            if not left:
                del self.running[rid]
        return out

    def has_work(self) -> bool:
        return bool(self.running)

    def in_flight(self) -> list[str]:
        return list(self.running)


@register_operator
class Collect(MapOperator):
    name = "test_sage_collect"

    def open(self, ctx) -> None:
        super().open(ctx)
        EVENTS.append(f"open {ctx.node_id}")

    def close(self) -> None:
        EVENTS.append("close sink")

    def execute(self, item: object) -> None:
        COLLECTED.append(item)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    EVENTS.clear()
    COLLECTED.clear()


def test_builders_make_real_sage_subclasses() -> None:
    assert issubclass(sage_function("test_sage_source"), SourceFunction)
    assert issubclass(sage_function(Admit), MapFunction)
    assert issubclass(sage_function(Split, flat=True), FlatMapFunction)
    assert issubclass(sage_function("test_sage_collect", sink=True), SinkFunction)
    assert issubclass(sage_service("test_sage_echo_engine"), BaseService)
    assert issubclass(engine_caller("engine"), FlatMapFunction)
    # Bound parameters are defaults; the class's own keyword arguments (SAGE passes `.map(Cls, **kw)`) win.
    admit = sage_function("test_sage_admit", max_chars=3)
    assert admit().operator.max_chars == 3
    assert admit(max_chars=5).operator.max_chars == 5


def test_builders_refuse_what_sage_cannot_run() -> None:
    with pytest.raises(OperatorError, match="sage_service"):
        sage_function("test_sage_echo_engine")
    with pytest.raises(OperatorError, match="Step one"):
        sage_service("test_sage_admit")
    with pytest.raises(OperatorError, match="no parameter"):
        sage_function("test_sage_admit", max_tokens=3)
    with pytest.raises(OperatorError, match="not both"):
        sage_function("test_sage_collect", sink=True, flat=True)
    with pytest.raises(OperatorError, match="is a source"):
        sage_function("test_sage_source", flat=True)
    with pytest.raises(OperatorError, match="unknown operator"):
        sage_function("no_such_operator")


def test_map_function_keeps_the_operator_contract() -> None:
    admit = sage_function("test_sage_admit")()
    error = RequestError(request_id="x", code="timeout", message="late")
    assert admit.execute(error) is error  # not in `accepts`: passes through untouched
    assert admit.execute(Request(request_id="a", prompt="hi")).prompt_token_ids == [104, 105]
    failed = admit.execute(Request(request_id="b", prompt="boom"))  # a raise fails only that request
    assert isinstance(failed, RequestError) and failed.code == "internal" and "boom" in failed.message
    with pytest.raises(TypeError, match="flat=True"):
        sage_function("test_sage_split")().execute("ab")
    assert sage_function("test_sage_split", flat=True)().execute("ab") == ["a", "b"]


def test_engine_service_steps_concurrent_callers_in_one_batch() -> None:
    service = sage_service("test_sage_echo_engine")()
    service.setup()
    prompts = {"a": "first", "b": "second"}
    results: dict[str, list] = {}

    def other_request_queued() -> None:
        """The stepper waits, in its first step and without the lock, until the other caller's request is queued
        (or already in this batch): that request must join the next step's batch."""
        deadline = time.monotonic() + 5
        while not (service._arrived or len(service.operator.running) > 1) and time.monotonic() < deadline:
            time.sleep(0.001)

    service.operator.before_step = other_request_queued

    def call(rid: str) -> None:
        tokens = [ord(c) for c in prompts[rid]]
        results[rid] = service.generate(Request(request_id=rid, prompt_token_ids=tokens))

    threads = [threading.Thread(target=call, args=(rid,)) for rid in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    service.cleanup()
    for rid, items in results.items():
        assert all(i.request_id == rid for i in items)
        assert [i for i in items if is_terminal(i)] == [items[-1]]
        assert "".join(chr(i.token_ids[0]) for i in items) == prompts[rid]
    assert service.operator.peak == 2  # the second caller's request joined the first one's steps
    assert EVENTS == ["open EchoEngineBaseService", "close engine"]  # no SAGE ctx here: named after the class


def test_a_failing_engine_step_fails_the_requests_it_held() -> None:
    service = sage_service("test_sage_echo_engine")()
    service.setup()
    items = service.generate(Request(request_id="a", prompt_token_ids=[ord(c) for c in "ok!"]))
    assert [type(i) for i in items] == [TokenDelta, TokenDelta, RequestError]
    assert items[-1].code == "internal" and "bad token" in items[-1].message
    service.cleanup()


def test_local_environment_runs_a_sagellm_pipeline() -> None:
    prompts = ("hello", "", "boom", "sage", "llm")
    env = LocalEnvironment("sagellm-test")
    env.register_service("engine", sage_service("test_sage_echo_engine"), max_running=4)
    (
        env.from_source(sage_function("test_sage_source"), prompts=prompts)
        .map(sage_function("test_sage_admit"))
        .flatmap(engine_caller("engine"))
        .sink(sage_function("test_sage_collect", sink=True))
    )
    env.submit(autostop=True)

    by_request: dict[str, list] = {}
    for item in COLLECTED:
        by_request.setdefault(item.request_id, []).append(item)
    assert len(by_request) == len(prompts)
    for rid, items in by_request.items():
        prompt = rid.split("-", 1)[1]
        assert [i for i in items if is_terminal(i)] == [items[-1]]  # exactly one terminal item, last
        if prompt == "":
            assert items[-1].code == "invalid_request"
        elif prompt == "boom":
            assert items[-1].code == "internal"
        else:
            assert "".join(chr(t) for i in items for t in i.token_ids) == prompt
            assert items[-1].finish_reason == "stop"
    assert "open engine" in EVENTS and "close engine" in EVENTS  # the service is opened and cleaned up
    assert EVENTS[-1] != "open engine" and "close sink" in EVENTS
