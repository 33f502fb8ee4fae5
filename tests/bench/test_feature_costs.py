"""`sagellm bench feature-costs` end to end on a tiny random Llama: the profile's buckets add up to its total, every
feature has its row, every armed engine is timed as often as the baseline, and the features without an armed engine
say why. Nothing here is judged by its timings; real numbers come from the command on the default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sagellm.benchmarks.feature_costs_arms import ARMS
from sagellm.benchmarks.feature_costs_buckets import (
    FEATURES,
    LORA,
    MODEL,
    ROOT,
    SAMPLER,
    SPECULATION,
    STATE_SLOTS,
    bucket_of_path,
    unplaced_modules,
)
from sagellm.cli.main import main
from tests.tiny_models import make_tiny_llama

STEPS = 6


def test_the_profile_s_buckets_add_up_and_every_armed_engine_is_timed(tmp_path: Path, capsys) -> None:
    model = make_tiny_llama(tmp_path / "tiny-llama")
    out = tmp_path / "feature_costs.json"
    argv = ["bench", "feature-costs", "--model", str(model), "--batch", "4", "--input-len", "20", "--output-len", "20"]
    argv += ["--steps", str(STEPS), "--warmup", "2", "--block", "4", "--threads", "1", "--out", str(out)]

    assert main(argv) == 0

    results = json.loads(out.read_text())
    profile = results["profile"]
    rows = {row["bucket"]: row for row in profile["buckets"]}
    assert set(FEATURES) <= set(rows)
    assert sum(r["us_per_step"] for r in rows.values()) == pytest.approx(profile["total_us_per_step"], rel=1e-9)
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
    assert rows[MODEL]["us_per_step"] > 0 and rows[SAMPLER]["us_per_step"] > 0  # torch's and the kernels' time too
    for row in rows.values():
        assert row["us_per_request_per_step"] == pytest.approx(row["us_per_step"] / 4)
    arms = {row["arm"]: row for row in results["arms"]}
    assert set(arms) == {"baseline", *ARMS}
    assert all(row["steps"] == STEPS and row["median_ms"] > 0 for row in arms.values())
    assert arms["baseline"]["delta_ms"] == 0 and arms["baseline"]["delta_ci95_ms"] is None
    for name in ARMS:
        low, high = arms[name]["delta_ci95_ms"]
        assert low <= arms[name]["delta_ms"] <= high or low == high  # the interval holds the median difference
    not_timed = {note["feature"]: note["why"] for note in results["not_timed"]}
    assert "no request can go without it" in not_timed[SPECULATION]
    assert "no recurrent layers" in not_timed[STATE_SLOTS]
    printed = capsys.readouterr().out
    assert "guided decoding" in printed and "armed but unused" in printed


def test_too_few_output_tokens_for_the_steps_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "feature_costs.json"
    argv = ["bench", "feature-costs", "--model", "unused", "--output-len", "20", "--steps", "10", "--out", str(out)]
    assert main(argv) != 0
    assert not out.exists()


def test_every_engine_module_is_placed_in_a_bucket() -> None:
    """A new module of runtime/engine needs a bucket of its own choosing, not a silent share of "other"."""
    assert unplaced_modules() == []
    assert bucket_of_path(ROOT / "runtime/engine/lora_slots.py") == LORA
    assert bucket_of_path(ROOT / "backends/native/lora.py") == LORA
    assert bucket_of_path(ROOT / "backends/native/ops.py") == MODEL
    assert bucket_of_path(ROOT / "runtime/engine/speculative/verify.py") == SPECULATION
    assert bucket_of_path("~") is None  # a builtin: charged to its callers
