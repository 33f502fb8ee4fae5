"""The engine Step operators on a tiny real model: what they emit, the stats route reads, SLO verdicts, errors."""

from __future__ import annotations

import pytest

from sagellm import SamplingParams
from sagellm.runtime.pipeline.messages import PrefillDone, Request, RequestError, TokenDelta
from sagellm.runtime.pipeline.operator import OperatorContext, get_operator
from tests.tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("engine_op") / "llama")


def opened(name: str, model_path, **params):
    op = get_operator(name)(model=str(model_path), max_num_seqs=2, **params)
    ctx = OperatorContext(name, instances={})
    op.open(ctx)
    return op, ctx


def drain(op) -> list:
    items = []
    while op.has_work():
        items += op.step()
    return items


def request(rid: str, **kw) -> Request:
    return Request(request_id=rid, prompt_token_ids=[5, 6, 7, 8], sampling=SamplingParams(max_tokens=4, temperature=0,
                   ignore_eos=True), **kw)  # fmt: skip


def test_engine_streams_deltas_and_judges_slos(model_path):
    op, ctx = opened("engine", model_path)
    assert ctx.instances["engine"].role == "colocated" and op.capacity() == 2
    assert op.add(request("fast", ttft_slo_ms=60_000)) == [] and op.add(request("slow", tpot_slo_ms=1e-6)) == []
    assert op.capacity() == 0 and ctx.instances["engine"].running == 2
    items = drain(op)
    final = {d.request_id: d for d in items if isinstance(d, TokenDelta) and d.finished}
    assert final["fast"].metrics.slo_met is True and final["slow"].metrics.slo_met is False
    assert all(d.metrics.num_output_tokens == 4 and d.metrics.num_prompt_tokens == 4 for d in final.values())
    assert op.capacity() == 2 and ctx.instances["engine"].running == 0


@pytest.mark.slow
def test_prefill_hands_over_and_decode_continues(model_path):
    prefill, _ = opened("prefill", model_path)
    decode, ctx = opened("decode", model_path)
    prefill.add(request("r"))
    (done,) = drain(prefill)
    assert isinstance(done, PrefillDone) and tuple(done.kv.data.shape[:3]) == (2, 2, 4)
    first = decode.add(done)
    rest = drain(decode)
    tokens = [t for d in first + rest for t in d.token_ids]
    handover = rest[-1].metrics.kv_handover_s  # the prefill's first token to the decode's
    assert handover == pytest.approx(first[0].time - done.first_token_time) and handover >= 0
    colocated, _ = opened("engine", model_path)
    colocated.add(request("r"))
    assert tokens == [t for d in drain(colocated) for t in d.token_ids]
    assert ctx.instances["decode"].role == "decode"


def test_bad_requests_become_errors(model_path):
    op, _ = opened("engine", model_path)
    (error,) = op.add(Request(request_id="x", prompt_token_ids=[10**9]))
    assert isinstance(error, RequestError) and error.code == "invalid_request"
    op.add(request("dup"))
    (error,) = op.add(request("dup"))
    assert error.code == "invalid_request" and "in use" in error.message


def test_a_request_whose_step_fails_ends_with_its_own_error_and_the_other_finishes(model_path):
    op, ctx = opened("engine", model_path)
    execute = op.engine.runner.execute

    def failing_for_poison(batch):  # an injected fault where the model runs
        if any(seq.request_id == "poison" for seq in batch.seqs):
            raise RuntimeError("injected")
        return execute(batch)

    op.engine.runner.execute = failing_for_poison
    op.add(request("poison"))
    op.add(request("fine"))
    items = drain(op)
    (error,) = [i for i in items if isinstance(i, RequestError)]
    assert error.request_id == "poison" and error.code == "internal" and "RuntimeError: injected" in error.message
    fine = [i for i in items if isinstance(i, TokenDelta) and i.request_id == "fine"]
    assert sum(len(d.token_ids) for d in fine) == 4 and fine[-1].finished
    assert op.in_flight() == [] and ctx.instances["engine"].running == 0
