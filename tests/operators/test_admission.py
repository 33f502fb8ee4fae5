"""The admission operator: every rejection code, the token bucket under a fake clock, and tokenization with the
real tokenizer and config of a tiny model saved to disk (as the executor loads them into `graph_attrs`)."""

from __future__ import annotations

import pytest

from sagellm.common.errors import FieldError
from sagellm.operators.admission import Admission
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.models.loaded import LoadedModel
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.pipeline.messages import Request, RequestError
from sagellm.runtime.pipeline.operator import OperatorContext, PipelineLoad
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


def attrs(model: LoadedModel) -> dict:
    return {"tokenizer": model.tokenizer, "model_config": model.config}


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
    op = make_admission({"tokenizer": model.tokenizer})
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


def test_context_length_parameter_and_graph_attr_override_the_model(model: LoadedModel) -> None:
    assert make_admission(attrs(model), max_model_len=64).max_model_len == 64
    assert make_admission(attrs(model) | {"max_model_len": 128}).max_model_len == 128
    assert make_admission().max_model_len is None  # nothing known: no length check


def test_overloaded_when_graph_is_full() -> None:
    load = PipelineLoad(in_flight=3)  # as the executor counts: this request and two more
    op = make_admission(load=load, max_queue=3)
    assert isinstance(op.execute(Request(request_id="ok", prompt_token_ids=[1])), Request)
    load.in_flight = 4
    out = expect_error(op.execute(Request(request_id="r", prompt_token_ids=[1])), "overloaded", "3", retryable=True)
    assert out.time == 1000.0


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
    [{"max_queue": 0}, {"max_model_len": 0}, {"rate_limit_per_user": 0.0}, {"burst": 0}],
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
