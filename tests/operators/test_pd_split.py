"""pd_split: the threshold counts uncached prompt tokens (not characters), and each reason the PD path cannot take a
long prompt keeps it colocated and is counted."""

import pytest

from sagellm.operators.pd_split import PDSplit
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext, get_operator, parameter_types


def make_split(instances: list[InstanceStats] | None = None, **params) -> PDSplit:
    if instances is None:
        instances = pd_pool()
    split = PDSplit(**params)
    split.open(OperatorContext(node_id="pd_split", outputs=["route"], instances={s.name: s for s in instances}))
    return split


def pd_pool() -> list[InstanceStats]:
    return [
        InstanceStats(name="p0", role="prefill"),
        InstanceStats(name="d0", role="decode", max_running=2),
        InstanceStats(name="d1", role="decode", max_running=2),
        InstanceStats(name="c0", role="colocated"),
    ]


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def phase(split: PDSplit, prompt_token_ids: list[int] | None, prompt: str | None = None) -> str:
    request = Request(request_id="r", prompt=prompt, prompt_token_ids=prompt_token_ids)
    out = split.execute(request)
    assert out is request
    return out.phase


def test_registered_with_typed_params():
    assert get_operator("pd_split") is PDSplit
    assert parameter_types(PDSplit) == {
        "threshold_tokens": (int, False),
        "block_size": (int, False),
        "max_transfer_failures": (int, False),
        "ratio": (float, False),
        "kv_events": (bool, False),
    }
    with pytest.raises(ValueError, match="threshold_tokens"):
        PDSplit(threshold_tokens=-1)
    with pytest.raises(ValueError, match="ratio"):
        PDSplit(ratio=-1.0)
    with pytest.raises(ValueError, match="max_transfer_failures"):
        PDSplit(max_transfer_failures=0)


def test_threshold_is_in_tokens_not_characters():
    split = make_split(threshold_tokens=512)
    assert phase(split, tokens(100), prompt="x" * 5000) == "colocated"  # long text, few tokens
    assert phase(split, tokens(511, start=10_000)) == "colocated"
    assert phase(split, tokens(512, start=20_000), prompt="short") == "prefill"  # at the threshold: PD
    assert split.decisions == {"short_prompt": 2, "pd": 1}


def test_a_ratio_also_splits_a_prompt_heavy_request():
    """With `ratio` (the seeds' "adaptive" PD policy), a prompt below the threshold splits when it is more than
    `ratio` times the output the request expects."""
    split = make_split(threshold_tokens=512, ratio=4.0)

    def expecting(output: int, prompt: list[int]) -> str:
        request = Request(request_id="r", prompt_token_ids=prompt)
        request.sampling.max_tokens = output
        return split.execute(request).phase

    assert expecting(50, tokens(201)) == "prefill"  # 201 > 4 x 50
    assert expecting(50, tokens(200, start=1000)) == "colocated"  # not more than 4 x 50
    assert expecting(500, tokens(600, start=2000)) == "prefill"  # over the threshold, whatever its output
    assert split.decisions == {"pd": 2, "short_prompt": 1}


def test_cached_prefix_does_not_count_as_prefill_work():
    split = make_split(threshold_tokens=512)
    document = tokens(600)
    assert phase(split, document) == "prefill"
    # 600 tokens cached as 37 full blocks (592 tokens): a follow-up question brings 8 + 200 new tokens.
    assert split.uncached_tokens(Request(request_id="q", prompt_token_ids=document + tokens(200, 5000))) == 208
    assert phase(split, document + tokens(200, start=5000)) == "colocated"
    assert phase(split, tokens(600, start=9000)) == "prefill"  # another document is not cached
    assert split.decisions == {"pd": 2, "short_prompt": 1}


def test_untokenized_request_stays_colocated():
    split = make_split()
    assert phase(split, None, prompt="y" * 10_000) == "colocated"
    assert split.decisions == {"no_prompt_tokens": 1}


@pytest.mark.parametrize(
    ("reason", "breakage"),
    [
        ("no_prefill_instance", lambda s: s.pop("p0")),
        ("prefill_unhealthy", lambda s: setattr(s["p0"], "healthy", False)),
        ("no_decode_instance", lambda s: (s.pop("d0"), s.pop("d1"))),
        ("decode_unhealthy", lambda s: (setattr(s["d0"], "healthy", False), setattr(s["d1"], "healthy", False))),
        (
            "kv_transfer_failing",
            lambda s: (setattr(s["d0"], "kv_transfer_failures", 3), setattr(s["d1"], "healthy", False)),
        ),
        ("decode_saturated", lambda s: (setattr(s["d0"], "running", 2), setattr(s["d1"], "running", 5))),
    ],
)
def test_each_fallback_keeps_a_long_prompt_colocated(reason, breakage):
    split = make_split()
    breakage(split.ctx.instances)
    assert phase(split, tokens(1000)) == "colocated"
    assert split.decisions == {reason: 1}


@pytest.mark.parametrize(
    "partial",
    [
        lambda s: setattr(s["d0"], "healthy", False),
        lambda s: setattr(s["d0"], "kv_transfer_failures", 7),
        lambda s: setattr(s["d0"], "running", 2),
        lambda s: s.pop("c0"),
    ],
)
def test_one_usable_decode_worker_is_enough_for_pd(partial):
    split = make_split()
    partial(split.ctx.instances)
    assert phase(split, tokens(1000)) == "prefill"
    assert split.decisions == {"pd": 1}


def test_transfer_failure_limit_is_a_parameter():
    instances = pd_pool()
    for name in ("d0", "d1"):
        next(s for s in instances if s.name == name).kv_transfer_failures = 3
    assert phase(make_split(instances, max_transfer_failures=3), tokens(1000)) == "colocated"
    assert phase(make_split(instances, max_transfer_failures=4), tokens(1000)) == "prefill"


def test_fallback_uses_current_stats():
    split = make_split()
    split.ctx.instances["p0"].healthy = False
    assert phase(split, tokens(1000)) == "colocated"
    split.ctx.instances["p0"].healthy = True
    assert phase(split, tokens(1000, start=50_000)) == "prefill"
    assert split.decisions == {"prefill_unhealthy": 1, "pd": 1}
