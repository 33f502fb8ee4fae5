"""The local executor on real operators and a tiny real model: a YAML graph runs to completion with every request
ending exactly once, identical to the offline engine, and failures become errors without stopping the graph."""

from __future__ import annotations

import json

import pytest

from sagellm import LLM, SamplingParams
from sagellm.runtime.executor.run import run_pipeline
from sagellm.runtime.pipeline.yaml_io import load_pipeline
from tests.tiny_models import make_tiny_llama

PROMPTS = ["hello world", "the quick brown fox jumps", "a", "over the lazy dog and far away"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("exec") / "llama")


def colocated_yaml(model, prompts, extra_nodes="", engine_params="{max_num_seqs: 4}", stdout=True) -> str:
    items = ", ".join(f'"{p}"' for p in prompts)
    return f"""
name: test
model: {model}
nodes:
  source:
    {{op: prompt_source, params: {{prompts: [{items}], max_tokens: 8, temperature: 0, ignore_eos: true, chat: false}}}}
  admission: {{op: admission}}
  sort: {{op: policy_sort, params: {{policy: fifo}}}}
  route: {{op: route}}
  engine: {{op: engine, params: {engine_params}}}
  metrics: {{op: metrics_sink}}
edges:
  - source -> admission -> sort -> route -> engine -> metrics
"""


@pytest.mark.slow
def test_colocated_graph_matches_the_offline_engine(model_path):
    result = run_pipeline(load_pipeline(colocated_yaml(model_path, PROMPTS)))
    expected = LLM(str(model_path), max_num_seqs=4).generate(
        PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )
    assert [result.outcomes[f"req-{i}"].token_ids for i in range(len(PROMPTS))] == [
        list(o.outputs[0].token_ids) for o in expected
    ]
    assert all(o.finish_reason == "length" for o in result.outcomes.values())
    snapshot = result.metrics()
    assert snapshot.completed == len(PROMPTS) and snapshot.failed == 0 and snapshot.active == 0


def test_admission_errors_end_their_requests_and_the_rest_is_served(model_path):
    graph = load_pipeline(colocated_yaml(model_path, ["fine prompt", ""]))
    result = run_pipeline(graph)
    assert result.outcomes["req-0"].finish_reason == "length"
    assert result.outcomes["req-1"].error.code == "invalid_request"


@pytest.mark.slow
def test_priority_requests_finish_ahead_of_low_ones_under_load(model_path, tmp_path):
    """One engine slot, 10 requests at once: with the priority policy the 3 urgent ones, sent last, overtake all
    the low ones still queued (at most the 3 the rendezvous pipeline already holds, in the engine, in route and in
    the queue's hand, run before them); with fifo they finish last."""
    requests = tmp_path / "requests.jsonl"
    lines = [{"prompt": f"low {i}", "priority": 2} for i in range(7)] + [
        {"prompt": f"urgent {i}", "priority": 0} for i in range(3)
    ]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    text = colocated_yaml(model_path, []).replace(
        "prompt_source, params: {prompts: [], max_tokens: 8, temperature: 0, ignore_eos: true, chat: false}",
        f"jsonl_source, params: {{path: {requests}, max_tokens: 8, temperature: 0}}",
    )
    for policy, window in (("priority", slice(0, 6)), ("fifo", slice(7, 10))):
        graph = load_pipeline(
            text.replace("policy: fifo", f"policy: {policy}").replace("max_num_seqs: 4", "max_num_seqs: 1")
        )
        result = run_pipeline(graph)
        finished = sorted(result.outcomes.values(), key=lambda o: o.metrics.e2e_s)
        order = [o.request_id for o in finished]
        urgent = {f"req-{i}" for i in range(7, 10)}
        assert all(o.finish_reason == "length" for o in finished)
        assert urgent <= set(order[window]), (policy, order)
