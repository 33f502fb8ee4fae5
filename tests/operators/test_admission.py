"""The admission operator: every rejection code, the token bucket under a fake clock, and tokenization with the
real tokenizer and config of a tiny model saved to disk (as the executor loads them into `graph_attrs`)."""

from __future__ import annotations

import pytest

from sagellm.common.errors import FieldError
from sagellm.operators.admission import Admission, SloLimit
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.models.loaded import LoadedModel
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.pipeline.messages import Request, RequestError
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext, PipelineLoad
from sagellm.runtime.pipeline.served_model import GIVEN, ServedModel, served_context
from tests.tiny_models import make_tiny_llama


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(make_tiny_llama(tmp_path_factory.mktemp("llama")), load_weights=False)


def make_admission(graph_attrs: dict | None = None, load: PipelineLoad | None = None, **params) -> Admission:
    op = Admission(**params)
    op.clock = FakeClock()
    op.open(OperatorContext(node_id="admission", load=load or PipelineLoad(), graph_attrs=graph_attrs or {}))
    return op


def attrs(model: LoadedModel, engines_context: int | None = None) -> dict:
    """The graph's model as `served_model` loads it, handed in: the engines' context is theirs, else the model's."""
    context = served_context(engines_context, model.config)
    return {GIVEN: ServedModel(model.source, model.tokenizer, model.config, None, context)}


def test_tokenizes_prompt_and_stamps_admission(model: LoadedModel) -> None:
    op = make_admission(attrs(model))
    out = op.execute(Request(request_id="r", prompt="The quick brown fox"))
    assert isinstance(out, Request)
    assert out.prompt_token_ids == model.tokenizer.encode("The quick brown fox", add_special_tokens=True)
    assert out.num_prompt_tokens > 0
    assert out.admitted_time == 1000.0


def test_given_token_ids_are_kept_and_need_no_tokenizer() -> None:
    out = make_admission().execute(Request(request_id="r", prompt="ignored", prompt_token_ids=[5, 6, 7]))
    assert isinstance(out, Request) and out.prompt_token_ids == [5, 6, 7]


def expect_error(out: object, code: str, text: str, retryable: bool = False) -> RequestError:
    assert isinstance(out, RequestError), out
    assert (out.code, out.retryable, out.request_id) == (code, retryable, "r")
    assert text in out.message, out.message
    return out


@pytest.mark.parametrize(
    "request_kwargs", [{}, {"prompt": ""}, {"prompt_token_ids": []}, {"prompt": "x", "prompt_token_ids": []}]
)
def test_empty_prompt_is_invalid(model: LoadedModel, request_kwargs: dict) -> None:
    out = make_admission(attrs(model)).execute(Request(request_id="r", **request_kwargs))
    expect_error(out, "invalid_request", "prompt is empty")


def test_text_without_tokenizer_is_invalid() -> None:
    expect_error(make_admission().execute(Request(request_id="r", prompt="hi")), "invalid_request", "no tokenizer")


@pytest.mark.parametrize("bad_id", [-1, "vocab"])
def test_token_ids_outside_vocabulary_are_invalid(model: LoadedModel, bad_id: int | str) -> None:
    vocab = model.config.vocab_size
    bad = vocab if bad_id == "vocab" else bad_id
    out = make_admission(attrs(model)).execute(Request(request_id="r", prompt_token_ids=[1, bad]))
    expect_error(out, "invalid_request", f"[0, {vocab})")


def test_vocabulary_falls_back_to_the_tokenizer_length(model: LoadedModel) -> None:
    op = make_admission({GIVEN: ServedModel(model.source, model.tokenizer, None)})
    assert op.vocab_size == len(model.tokenizer)
    expect_error(op.execute(Request(request_id="r", prompt_token_ids=[len(model.tokenizer)])), "invalid_request", "")


def test_context_length_from_the_model(model: LoadedModel) -> None:
    op = make_admission(attrs(model))
    assert op.max_model_len == model.config.max_position_embeddings == 256
    fits = Request(request_id="ok", prompt_token_ids=[3] * 240, sampling=SamplingParams(max_tokens=16))
    assert isinstance(op.execute(fits), Request)
    too_long = Request(request_id="r", prompt_token_ids=[3] * 241, sampling=SamplingParams(max_tokens=16))
    expect_error(
        op.execute(too_long),
        "context_length_exceeded",
        "This model's maximum context length is 256 tokens. However, you requested 257 tokens "
        "(241 in the messages, 16 in the completion).",
    )


def test_unbounded_completion_counts_one_token(model: LoadedModel) -> None:
    op = make_admission(attrs(model))
    request = Request(request_id="r", prompt_token_ids=[3] * 256, sampling=SamplingParams(max_tokens=None))
    expect_error(op.execute(request), "context_length_exceeded", "257 tokens (256 in the messages, 1 in the")


def test_context_length_parameter_and_the_engines_context_override_the_model(model: LoadedModel) -> None:
    assert make_admission(attrs(model), max_model_len=64).max_model_len == 64
    assert make_admission(attrs(model, engines_context=128)).max_model_len == 128
    assert make_admission().max_model_len is None  # nothing known: no length check


def test_overloaded_when_graph_is_full() -> None:
    load = PipelineLoad(in_flight=3)  # as the executor counts: this request and two more
    op = make_admission(load=load, max_queue=3)
    assert isinstance(op.execute(Request(request_id="ok", prompt_token_ids=[1])), Request)
    load.in_flight = 4
    out = expect_error(op.execute(Request(request_id="r", prompt_token_ids=[1])), "overloaded", "3", retryable=True)
    assert out.time == 1000.0
    retried = op.execute(Request(request_id="r.2", prompt_token_ids=[1], retry=1))
    assert isinstance(retried, Request)  # a failover attempt was admitted once: never shed for load


def test_retry_after_is_when_those_ahead_will_have_been_served() -> None:
    load = PipelineLoad(in_flight=6)
    op = make_admission(load=load, max_queue=4)
    unknown = op.execute(Request(request_id="r", prompt_token_ids=[1]))
    assert isinstance(unknown, RequestError) and unknown.retry_after_s == 1.0  # no request ended yet: a second
    load.recent_ends.extend([990.0 + i for i in range(10)])  # 10 ended over the last 10 s: one a second
    shed = op.execute(Request(request_id="r", prompt_token_ids=[1]))
    # ahead of it: the 6 in flight and the client refused within the last Retry-After (1 s), served at 1/s
    assert isinstance(shed, RequestError) and shed.retry_after_s == pytest.approx(7.0)
    op.clock.now += 30  # the earlier refusals fall out of the window; the ends' rate halves over its longer span
    assert op.execute(Request(request_id="r", prompt_token_ids=[1])).retry_after_s == pytest.approx(24.0)
    load.in_flight = 500
    assert op.execute(Request(request_id="r", prompt_token_ids=[1])).retry_after_s == 60.0  # at most a minute


def test_the_bound_in_tokens_counts_prompt_and_completion_until_the_request_ends() -> None:
    load = PipelineLoad(in_flight=1)
    op = make_admission(load=load, max_tokens_in_flight=100)

    def request(rid: str, max_tokens: int) -> Request:
        return Request(request_id=rid, prompt_token_ids=[1] * 10, sampling=SamplingParams(max_tokens=max_tokens))

    assert isinstance(op.execute(request("a", 50)), Request) and load.tokens_in_flight == 60
    shed = op.execute(request("b", 50))
    assert isinstance(shed, RequestError) and shed.code == "overloaded" and "60 of 100 tokens" in shed.message
    assert isinstance(op.execute(request("c", 30)), Request) and load.tokens_in_flight == 100
    never = op.execute(request("d", 200))
    assert isinstance(never, RequestError) and never.code == "invalid_request"
    load.release_tokens("a")  # the ledger does it as the request ends
    assert load.tokens_in_flight == 40 and isinstance(op.execute(request("b", 50)), Request)


def test_a_group_is_admitted_or_refused_whole() -> None:
    load = PipelineLoad(in_flight=2)
    op = make_admission(load=load, max_queue=8)
    group = [Request(request_id=f"g{i}", prompt_token_ids=[1]) for i in range(5)]
    assert op.admit_group(group, waiting=0) is None
    refused = op.admit_group(group, waiting=2)  # 2 submitted ahead of it: room for 4
    assert isinstance(refused, RequestError) and refused.code == "overloaded" and "room for 4" in refused.message
    too_many = op.admit_group(group * 2, waiting=0)
    assert isinstance(too_many, RequestError) and too_many.code == "invalid_request"


def test_a_group_is_admitted_whole_once_and_a_refused_one_gives_back_what_its_prompts_took() -> None:
    load = PipelineLoad()
    op = make_admission(load=load, max_model_len=8, rate_limit_per_user=1.0, burst=3, max_tokens_in_flight=100)
    fits = Request(request_id="a", prompt_token_ids=[1] * 4, user="u")
    too_long = Request(request_id="b", prompt_token_ids=[1] * 9, user="u")
    refused = op.admit_group([fits, too_long], waiting=0)
    assert isinstance(refused, RequestError) and refused.code == "context_length_exceeded"
    assert load.tokens_in_flight == 0 and fits.admitted_time is None  # `a`'s tokens and stamp given back ...
    group = [Request(request_id=f"g{i}", prompt_token_ids=[1] * 4, user="u") for i in range(2)]
    assert op.admit_group(group, waiting=0) is None  # ... and its bucket's token (`b`, refused, spent its own)
    assert load.tokens_in_flight == 2 * (4 + 1) and all(r.admitted_time == 1000.0 for r in group)
    load.in_flight = 10  # over max_queue, and the user's bucket is empty: the graph's node lets them through anyway
    assert op.execute(group[0]) is group[0] and load.tokens_in_flight == 2 * (4 + 1)


def test_rate_limit_token_bucket_per_user() -> None:
    op = make_admission(rate_limit_per_user=2.0, burst=3)
    clock = op.clock
    assert isinstance(clock, FakeClock)

    def admit(user: str | None) -> bool:
        return isinstance(op.execute(Request(request_id="r", prompt_token_ids=[1], user=user)), Request)

    assert [admit("alice") for _ in range(4)] == [True, True, True, False]  # the burst, then empty
    expect_error(op.execute(Request(request_id="r", prompt_token_ids=[1], user="alice")), "rate_limited", "alice", True)
    assert admit("bob") and admit(None) and admit(None)  # buckets are per user; anonymous users share one
    clock.now += 0.5  # refills 1 token at 2/s
    assert [admit("alice"), admit("alice")] == [True, False]
    clock.now += 100  # refills only up to the burst
    assert [admit("alice") for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize(
    "params",
    [{"max_queue": 0}, {"max_model_len": 0}, {"rate_limit_per_user": 0.0}, {"burst": 0}, {"ttft_slo_ms": 0.0}],
)
def test_bad_parameters_are_rejected(params: dict) -> None:
    name = next(iter(params))
    with pytest.raises(FieldError, match=name) as raised:
        Admission(**params)
    assert raised.value.field == name


def test_chat_messages_are_rendered_with_the_model_template_then_tokenized(model: LoadedModel) -> None:
    admission, tokenizer = make_admission(attrs(model)), model.tokenizer
    messages = [{"role": "user", "content": "hello"}]
    out = admission.execute(Request(request_id="c", messages=messages))
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt == expected and out.prompt_token_ids == tokenizer.encode(expected, add_special_tokens=True)


@pytest.mark.parametrize("ids", [[1.5, 2.0], [True, 2], [1, "2"]])
def test_token_ids_that_are_not_integers_are_invalid(model: LoadedModel, ids: list) -> None:
    """A JSON body gives floats and booleans as easily as integers: they are refused here, before any engine."""
    out = make_admission(attrs(model)).execute(Request(request_id="r", prompt_token_ids=ids))
    expect_error(out, "invalid_request", "prompt_token_ids must be integers")


def first_tokens(load: PipelineLoad, *ttfts_s: float) -> None:
    """Requests getting their first token after these waits, as the executor records them."""
    load.recent_ttfts.extend(ttfts_s)
    load.ttfts_seen += len(ttfts_s)


def test_slo_limit_cuts_before_the_target_is_missed_recovers_fast_far_from_it_and_probes_near_it() -> None:
    load, limit = PipelineLoad(), SloLimit(ceiling=32, target_s=1.0, window=8)  # margin 0.7: cut above 0.7 s
    first_tokens(load, *[0.1] * 7)
    assert limit.update(load, 0.0) == 32  # a window is not judged before it is full
    first_tokens(load, 0.85)
    assert limit.update(load, 0.0) == 24  # its slowest came within the margin of the target: cut by a quarter
    first_tokens(load, *[0.5] * 8)
    assert limit.update(load, 0.0) == 25  # near the target (0.35-0.7 s): one more
    first_tokens(load, *[0.1] * 8)
    assert limit.update(load, 0.0) == 31  # far below it: a quarter more
    first_tokens(load, *[0.1] * 16)
    assert limit.update(load, 0.0) == 32  # both windows at once count as one; never above the configured bound
    for _ in range(20):
        first_tokens(load, *[3.0] * 8)
        limit.update(load, 0.0)
    assert limit.update(load, 0.0) == 1  # never below one request


def test_slo_limit_cuts_as_soon_as_a_waiting_request_nears_the_target_once_per_margin() -> None:
    load, limit = PipelineLoad(oldest_waiting=100.0), SloLimit(ceiling=32, target_s=1.0, window=8)
    assert limit.update(load, 100.6) == 32  # waited 0.6 s: within the margin
    assert limit.update(load, 100.9) == 24  # 0.9 s: it is about to miss; cut before any first token says so
    assert limit.update(load, 101.5) == 24  # the cut needs time to act: not again within 0.7 s
    assert limit.update(load, 101.8) == 18
    first_tokens(load, *[0.1] * 8)
    load.oldest_waiting = None
    assert limit.update(load, 102.0) == 22  # nothing waits, first tokens come fast: grows back


def test_slo_limit_never_cuts_below_the_engines_slots() -> None:
    load, limit = PipelineLoad(), SloLimit(ceiling=32, target_s=1.0, window=8)
    for _ in range(20):
        first_tokens(load, *[3.0] * 8)
        limit.update(load, 0.0, floor=16)
    assert limit.update(load, 0.0, floor=16) == 16  # a bound under them idles engines and shortens no wait
    assert limit.update(load, 0.0, floor=64) == 32  # nor above the configured bound


def test_the_slo_bound_keeps_room_for_every_healthy_decoding_engine_slot() -> None:
    load = PipelineLoad()
    op = Admission(max_queue=32, ttft_slo_ms=1000)
    op.clock = FakeClock()
    instances = {
        "p": InstanceStats("p", role="prefill", max_running=8),
        "d": InstanceStats("d", role="decode", max_running=6),
        "e": InstanceStats("e", max_running=4),
        "lost": InstanceStats("lost", max_running=100, healthy=False),
    }
    op.open(OperatorContext(node_id="admission", load=load, instances=instances))
    for _ in range(20):
        first_tokens(load, *[3.0] * 8)
        op.execute(Request(request_id="r", prompt_token_ids=[1]))
    assert op.bound() == 10  # the decode and colocated engines' slots; prefill's slots hand on, a lost one has none


def test_a_ttft_slo_stamps_requests_and_tightens_the_bound_while_first_tokens_come_late() -> None:
    load = PipelineLoad(in_flight=10)
    op = make_admission(load=load, max_queue=16, ttft_slo_ms=2000)
    admitted = op.execute(Request(request_id="a", prompt_token_ids=[1]))
    own = op.execute(Request(request_id="b", prompt_token_ids=[1], ttft_slo_ms=1))
    assert isinstance(admitted, Request) and admitted.ttft_slo_ms == 2000  # the default target
    assert isinstance(own, Request) and own.ttft_slo_ms == 1  # a request's own target is kept, and judges nothing
    first_tokens(load, *[0.1] * 6, 1.7, 2.5)  # a window whose slowest came near the 2 s target: the bound drops to 12
    load.in_flight = 13
    out = expect_error(op.execute(Request(request_id="r", prompt_token_ids=[1])), "overloaded", "TTFT SLO", True)
    assert "12 requests in flight" in out.message
    load.in_flight = 12
    assert isinstance(op.execute(Request(request_id="d", prompt_token_ids=[1])), Request)
