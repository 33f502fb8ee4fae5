"""Whole pipeline graphs as SAGE jobs (`sagellm.sage.from_graph`): the same YAML gives the same greedy tokens under
`sagellm run`'s executor, the DSL and SAGE's LocalEnvironment, with every operator kind (source, map, the policy
queue, route's addressed outputs, engines, PD's prefill -> KV transfer -> decode) and one shared pipeline context.
Real engines on a tiny random Llama made here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from sagellm.dsl import Pipeline
from sagellm.operators.replay_source import ReplaySource
from sagellm.operators.route import Route
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.executor.run import run_pipeline
from sagellm.runtime.pipeline.messages import Request, TokenDelta
from sagellm.runtime.pipeline.operator import StreamOperator, register_operator
from sagellm.runtime.pipeline.yaml_io import load_pipeline
from sagellm.sage import from_graph
from tests.tiny_models import make_tiny_llama

PROMPTS = ["the quick brown fox", "a b c d e f g", "hello", "one two three four five six seven eight", "x y"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("sage-job") / "llama")


def _source(prompts: list[str], max_tokens: int = 6) -> str:
    items = ", ".join(f'"{p}"' for p in prompts)
    params = f"prompts: [{items}], max_tokens: {max_tokens}, temperature: 0, ignore_eos: true"
    return f"{{op: prompt_source, params: {{{params}}}}}"


def colocated(model: Path, prompts: list[str], *, policy: str = "fifo", max_queue: int = 1024, seqs: int = 4) -> str:
    return f"""
name: colocated-test
model: {model}
nodes:
  source: {_source(prompts)}
  admission: {{op: admission, params: {{max_queue: {max_queue}}}}}
  sort: {{op: policy_sort, params: {{policy: {policy}}}}}
  route: {{op: route}}
  engine: {{op: engine, params: {{max_num_seqs: {seqs}}}}}
  metrics: {{op: metrics_sink}}
edges:
  - source -> admission -> sort -> route -> engine -> metrics
"""


def pd(model: Path, prompts: list[str]) -> str:
    return f"""
name: pd-test
model: {model}
nodes:
  source: {_source(prompts)}
  admission: {{op: admission}}
  sort: {{op: policy_sort}}
  pd_split: {{op: pd_split, params: {{threshold_tokens: 4}}}}
  route: {{op: route}}
  prefill: {{op: prefill, placement: "process:prefill", params: {{max_num_seqs: 4}}}}
  kv_transfer: {{op: kv_transfer, placement: "process:decode"}}
  decode: {{op: decode, placement: "process:decode", params: {{max_num_seqs: 4}}}}
  metrics: {{op: metrics_sink}}
edges:
  - source -> admission -> sort -> pd_split -> route -> [prefill, decode]
  - prefill -> kv_transfer -> decode -> metrics
"""


def two_engines(model: Path, prompts: list[str]) -> str:
    return f"""
name: two-engines-test
model: {model}
nodes:
  source: {_source(prompts, max_tokens=12)}
  admission: {{op: admission}}
  sort: {{op: policy_sort}}
  route: {{op: route, params: {{strategy: load_balanced}}}}
  engine_a: {{op: engine, params: {{max_num_seqs: 2}}}}
  engine_b: {{op: engine, params: {{max_num_seqs: 2}}}}
  metrics: {{op: metrics_sink}}
edges:
  - source -> admission -> sort -> route -> [engine_a, engine_b]
  - engine_a -> metrics
  - engine_b -> metrics
"""


def tokens(result) -> dict[str, list[int]]:
    return {rid: o.token_ids for rid, o in result.outcomes.items()}


def test_a_colocated_graph_gives_the_executors_greedy_tokens(model: Path) -> None:
    text = colocated(model, PROMPTS)
    executor = run_pipeline(load_pipeline(text))
    job = from_graph(load_pipeline(text)).run()
    assert tokens(job) == tokens(executor) and len(job.outcomes) == len(PROMPTS)
    assert all(o.finish_reason == "length" and len(o.token_ids) == 6 for o in job.outcomes.values())
    assert job.metrics().completed == len(PROMPTS)  # the metrics sink saw every request end


def test_pd_runs_prefill_kv_transfer_and_decode_in_one_sage_job(model: Path) -> None:
    """Placements are not used (a SAGE local job is one process): the KV moves in-process, and the greedy tokens
    are those of the executor running prefill and decode in two worker processes."""
    text = pd(model, PROMPTS)
    executor = run_pipeline(load_pipeline(text))
    job = from_graph(load_pipeline(text)).run()
    assert tokens(job) == tokens(executor)
    decisions = job.operators["pd_split"].decisions
    assert decisions == executor.operators["pd_split"].decisions and decisions["pd"] >= 2  # both paths were taken
    handed_over = [o for o in job.outcomes.values() if o.metrics.kv_handover_s is not None]
    assert len(handed_over) == decisions["pd"]  # the decode engine took each prefilled request's KV


def test_the_dsl_graph_runs_as_a_sage_job(model: Path) -> None:
    p = Pipeline("dsl", model=str(model))
    source = p.add("prompt_source", prompts=PROMPTS[:3], max_tokens=5, temperature=0.0, ignore_eos=True)
    p.chain(source, p.add("admission"), p.add("policy_sort"), p.add("route"), p.add("engine"), p.add("metrics_sink"))
    graph = p.graph()
    assert tokens(from_graph(graph).run()) == tokens(run_pipeline(graph))


class RecordingRoute(Route):
    """The real route, remembering where it sent each request."""

    name = "route"
    chosen: dict[str, str]

    def execute(self, item: Request):
        out = super().execute(item)
        self.chosen = getattr(self, "chosen", {}) | {item.request_id: getattr(out, "to", None)}
        return out


def test_route_spreads_requests_over_two_engines_by_their_shared_stats(model: Path) -> None:
    """route reads the engines' live InstanceStats (one shared context): with two requests per engine at most, six
    requests go to both engines, and the tokens equal the executor's."""
    prompts = [f"request number {i}" for i in range(6)]
    text = two_engines(model, prompts)
    route = RecordingRoute(strategy="load_balanced")
    job = from_graph(load_pipeline(text), operators={"route": route}).run()
    assert tokens(job) == tokens(run_pipeline(load_pipeline(text)))
    assert sorted(route.chosen) == sorted(job.outcomes) and set(route.chosen.values()) == {"engine_a", "engine_b"}


def test_admission_sees_the_real_load_and_a_bad_request_ends_alone(model: Path) -> None:
    """max_queue 2, every request released at once: admission reads the shared PipelineLoad and turns away those
    beyond the bound (`overloaded`), as under the executor (with a context of its own it would see an empty graph
    and admit all). A prompt longer than the model's context fails alone; every request ends exactly once."""
    prompts = ["word " * 400, "alpha beta", "gamma delta", "epsilon", "zeta eta", "theta"]
    text = colocated(model, prompts, max_queue=2)
    for result in (from_graph(load_pipeline(text)).run(), run_pipeline(load_pipeline(text))):
        codes = {rid: o.error.code if o.error else o.finish_reason for rid, o in result.outcomes.items()}
        assert sorted(codes) == [f"req-{i}" for i in range(len(prompts))]
        assert codes["req-0"] == "context_length_exceeded"
        assert "overloaded" in codes.values() and "length" in codes.values()
        served = [o for o in result.outcomes.values() if o.error is None]
        assert all(len(o.token_ids) == 6 for o in served)


def test_the_policy_queue_orders_what_waits_for_a_full_engine(model: Path) -> None:
    """One sequence at a time, priority policy: the queue pops only when the engine has room, so the requests that
    waited start in priority order (lower first), not in arrival order."""

    def request(priority: int, max_tokens: int) -> Request:
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return Request(request_id=f"p{priority}", prompt=f"priority {priority}", sampling=sampling, priority=priority)

    requests = [request(5, 48)] + [request(p, 4) for p in (3, 2, 1, 0)]  # the others come while p5 runs
    graph = load_pipeline(colocated(model, ["unused"], policy="priority", seqs=1))
    job = from_graph(graph, operators={"source": ReplaySource(requests)}).run()
    started = sorted(job.outcomes.values(), key=lambda o: o.metrics.first_token_time)
    assert [o.request_id for o in started] == ["p5", "p0", "p1", "p2", "p3"]  # p5 was alone when it came


@register_operator
class SageTalker(StreamOperator):
    """A server stand-in: three tokens a request, 10 ms apart, `at_once` requests at a time; raises midway on
    `fail`, stops without a result on `mute`."""

    name = "test_sage_talker"
    accepts = (Request,)
    serving: ClassVar[int] = 0
    most: ClassVar[int] = 0

    def __init__(self, at_once: int = 2, fail: str = "", mute: str = "") -> None:
        self.at_once, self.fail, self.mute = at_once, fail, mute

    def capacity(self) -> int:
        return self.at_once

    async def serve(self, item: Request) -> AsyncIterator[Any]:
        cls = type(self)
        cls.serving += 1
        cls.most = max(cls.most, cls.serving)
        try:
            for i in range(3):
                await trio.sleep(0.01)
                if i == 1 and item.request_id in (self.fail, self.mute):
                    if item.request_id == self.fail:
                        raise RuntimeError("server fell over")
                    return
                yield TokenDelta(request_id=item.request_id, token_ids=[i], finish_reason="length" if i == 2 else None)
        finally:
            cls.serving -= 1


def test_a_stream_operator_serves_in_its_own_trio_loop() -> None:
    """A Stream operator (what reaches an OpenAI-compatible server) in a SAGE job: at most `capacity()` items at
    once, each ending once; one that raises or stops without a result ends alone with an error, as under the
    executor."""
    text = """
name: streams
nodes:
  source: {op: replay_source}
  talker: {op: test_sage_talker, params: {at_once: 2, fail: r2, mute: r4}}
  metrics: {op: metrics_sink}
edges:
  - source -> talker -> metrics
"""

    def requests() -> list[Request]:
        return [Request(request_id=f"r{i}", prompt_token_ids=[1, 2]) for i in range(6)]

    SageTalker.most = 0
    job = from_graph(load_pipeline(text), operators={"source": ReplaySource(requests())}).run()
    assert SageTalker.most == 2  # capacity() held
    executor = run_pipeline(load_pipeline(text), operators={"source": ReplaySource(requests())})
    assert tokens(job) == tokens(executor) and len(job.outcomes) == 6
    assert job.outcomes["r2"].error.code == job.outcomes["r4"].error.code == "internal"
    assert "ended without a result" in job.outcomes["r4"].error.message
    assert all(job.outcomes[f"r{i}"].token_ids == [0, 1, 2] for i in (0, 1, 3, 5))
