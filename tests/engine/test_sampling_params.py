"""SamplingParams: vLLM-compatible defaults, normalization, and a ValueError naming the field for every bad value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sagellm.runtime.engine.sampling_params import SamplingParams, model_sampling_defaults


def test_defaults_are_vllms_with_no_max_tokens_bound_but_the_context() -> None:
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.logprobs) == (None, [], [], None)
    assert (p.ignore_eos, p.include_stop_str_in_output, p.skip_special_tokens) == (False, False, True)
    assert not p.is_greedy


def test_a_request_s_values_win_over_the_model_s_which_win_over_the_class_s() -> None:
    model = {"temperature": 0.6, "top_p": 0.9, "max_tokens": 512}
    p = SamplingParams.with_defaults(model, temperature=0.0, top_p=None, seed=7)
    assert (p.temperature, p.top_p, p.max_tokens, p.seed, p.top_k) == (0.0, 0.9, 512, 7, 0)
    assert SamplingParams.with_defaults(None) == SamplingParams()


def test_a_model_s_bad_default_is_named_with_its_file_when_it_loads() -> None:
    class Loaded:
        source = Path("/models/odd")
        sampling_defaults = {"temperature": -1.0}

    with pytest.raises(ValueError, match=r"/models/odd: its sampling defaults .*temperature must be >= 0"):
        model_sampling_defaults(Loaded())
    Loaded.sampling_defaults = {"temperature": 0.7, "top_k": 20}
    assert model_sampling_defaults(Loaded()) == {"temperature": 0.7, "top_k": 20}


def test_normalization() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []  # type: ignore[arg-type]
    assert SamplingParams(stop_token_ids=(2, 7)).stop_token_ids == [2, 7]  # type: ignore[arg-type]


def test_accepted_edges() -> None:
    SamplingParams(max_tokens=None, temperature=0, top_p=1e-3, top_k=-1, min_p=1.0, seed=0, logprobs=0)
    SamplingParams(top_k=1, logprobs=20, seed=2**64 - 1)
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0, top_k=5, seed=3).is_greedy


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("n", 17, "an integer in [1, 16]"),
        ("n", 0, "an integer in [1, 16]"),
        ("max_tokens", 0, "an integer in [1, 2**63) or None"),
        ("max_tokens", 1.5, "an integer in [1, 2**63) or None"),
        ("max_tokens", 2**63, "an integer in [1, 2**63) or None"),  # wider than the wire's 64-bit integers
        ("temperature", -1, ">= 0"),
        ("temperature", float("nan"), ">= 0"),
        ("temperature", "hot", ">= 0"),
        ("top_p", 0.0, "in (0, 1]"),
        ("top_p", 1.01, "in (0, 1]"),
        ("top_k", -2, "-1 or 0 (off) or an integer >= 1"),
        ("top_k", 2.0, "-1 or 0 (off) or an integer >= 1"),
        ("top_k", 10**30, "-1 or 0 (off) or an integer >= 1"),
        ("min_p", -0.1, "in [0, 1]"),
        ("min_p", 1.5, "in [0, 1]"),
        ("seed", "abc", "None or an integer"),
        ("seed", 2**64, "None or an integer"),
        ("stop", "", "non-empty string"),
        ("stop", ["ok", ""], "non-empty string"),
        ("stop", 5, "non-empty string"),
        ("stop_token_ids", [-1], "integers in [0, 2**63)"),
        ("stop_token_ids", [2**64], "integers in [0, 2**63)"),
        ("stop_token_ids", 5, "integers in [0, 2**63)"),
        ("logprobs", 21, "in [0, 20]"),
        ("logprobs", -1, "in [0, 20]"),
        ("ignore_eos", "yes", "a bool"),
        ("include_stop_str_in_output", 1, "a bool"),
        ("skip_special_tokens", None, "a bool"),
    ],
)
def test_invalid_value_names_field_and_range(field: str, value: object, rule: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be .*{re.escape(rule)}.*, got {re.escape(repr(value))}$"):
        SamplingParams(**{field: value})


def test_message_reads_naturally() -> None:
    with pytest.raises(ValueError, match=r"^temperature must be >= 0, got -1$"):
        SamplingParams(temperature=-1)
