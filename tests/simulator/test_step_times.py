"""`sagellm bench steps` on a tiny random Llama: on the bare engine the steps it times are the compositions it meant
(read from the scheduler's batch, prompt chunks' earlier context included), in the serving pipeline the calibration
trace runs every batch size and chunks after earlier context, and the fitted `StepModel` is sane and survives its
file; `StepModel.fit` itself on synthetic steps whose coefficients (and neighbour slowdowns) are known, and
`fit_speed` on steps run at a known speed; a file that is not a step model is refused by name."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from sagellm.benchmarks.step_timer import busy_fraction, pool
from sagellm.benchmarks.step_times import (
    StepBenchConfig,
    calibrate,
    calibrate_pd_workers,
    planned_samples,
    write_results,
)
from sagellm.runtime.engine.step_trace import TimedStep
from sagellm.simulator.step_model import COEFFICIENTS, StepModel, StepSample, fit_speed
from tests.tiny_models import make_tiny_llama

TINY = dict(
    bare=True,
    max_num_seqs=4,
    max_num_batched_tokens=64,
    threads=1,
    context_lens=(16, 96),
    chunk_sizes=(8, 32, 64),
    long_prompt_lens=(160,),  # chunks of 64, 64, 32 tokens after 0, 64, 128 earlier ones
    mixed_long_len=128,
    mixed_batch_sizes=(1, 3),
    mixed_chunk_sizes=(8, 64),
    repeats=3,
    window_s=0.0,  # the tiny model's steps take a millisecond: the timing windows the real model gets cost seconds
    retries=0,
    progress=False,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def calibration(tiny: Path):
    return calibrate(StepBenchConfig(model=str(tiny), **TINY))


def test_calibration_times_the_compositions_it_builds(calibration) -> None:
    config = StepBenchConfig(model="", **TINY)
    assert len(calibration.samples) == planned_samples(config)
    by_kind = {
        kind: [s for s, k in zip(calibration.samples, calibration.kinds) if k == kind] for kind in calibration.kinds
    }
    assert sorted(s.prefill_tokens for s in by_kind["prefill"]) == [8, 32, 64]
    assert all(s.decode_seqs == 0 and s.context_tokens == 0 and not s.prefill_context for s in by_kind["prefill"])
    # A long prompt chunk by chunk: each chunk's tokens x the prompt tokens computed before it.
    assert [(s.prefill_tokens, s.prefill_context) for s in by_kind["chunked"]] == [
        (64, 0),
        (64, 64 * 64),
        (32, 32 * 128),
    ]
    # Requests join one by one: every batch size at both context lengths, each decode's context at least its prompt.
    assert [s.decode_seqs for s in by_kind["decode"]] == [1, 2, 3, 4] * 2
    assert all(s.prefill_tokens == 0 and s.context_tokens > 16 * s.decode_seqs for s in by_kind["decode"])
    # Beside 3 decodes a 64-token chunk is cut to the 61 tokens the budget leaves; fresh chunks attend over nothing.
    fresh = {(s.decode_seqs, s.prefill_tokens) for s in by_kind["mixed"] if not s.prefill_context}
    assert fresh == {(1, 8), (1, 63), (3, 8), (3, 61)}
    # The 128-token prompt beside 3 decodes: chunks of 61, 61 and 6 tokens, the later ones after the earlier.
    later = [
        (s.prefill_tokens, s.prefill_context) for s in by_kind["mixed"] if s.decode_seqs == 3 and s.prefill_context
    ]
    assert later == [(61, 61 * 61), (6, 6 * 122)]
    assert all(s.seconds > 0 for s in calibration.samples)


def test_calibrated_model_is_sane_and_round_trips(calibration, tmp_path: Path) -> None:
    model = calibration.model
    # Signs only: on a tiny model a prompt token costs microseconds, which a busy machine's noise can hide (the
    # coefficients themselves are checked by `StepModel.fit` on synthetic steps below).
    assert all(getattr(model, name) >= 0 for name in COEFFICIENTS)
    assert (model.max_num_seqs, model.max_num_batched_tokens) == (4, 64)
    errors = calibration.errors()
    assert np.median(errors) < 0.25, f"fit error p50 {np.median(errors):.1%} on its own samples"
    assert model.source["samples"] == len(calibration.samples) and model.source["cpu"]

    write_results(calibration, tmp_path / "model.json", tmp_path / "samples.json")
    assert StepModel.load(tmp_path / "model.json") == model
    rows = json.loads((tmp_path / "samples.json").read_text())["samples"]
    assert [row["kind"] for row in rows] == calibration.kinds


def test_pipeline_calibration_serves_every_batch_size(tiny: Path) -> None:
    config = StepBenchConfig(
        model=str(tiny),
        max_num_seqs=4,
        max_num_batched_tokens=64,
        threads=1,
        trace_prompt_lens=(8, 40, 160),
        trace_output_lens=(4, 16),
        trace_short_prompt_lens=(8, 24),
        trace_short_output_lens=(4, 8),
        quiet_cores=100.0,  # the tiny model's steps are a millisecond: judge the compositions, not the machine
        progress=False,
    )
    calibration = calibrate(config)
    source = calibration.model.source
    assert source["calibrated"].startswith("in the serving pipeline")
    climb = [(0, 1), (3, 2), (7, 3), (12, 4)]  # (released before, in flight); the last phase turns over twice
    assert [tuple(phase) for phase in source["trace"]["phases"]] == climb + [(24 + a, n) for a, n in climb]
    assert sum(calibration.steps) == source["steps_timed"] > len(calibration.samples)
    samples = calibration.samples
    assert {s.decode_seqs for s in samples if not s.prefill_tokens} == {1, 2, 3, 4}
    short = {s.decode_seqs for s in samples if not s.prefill_tokens and s.context_tokens <= 32 * s.decode_seqs}
    assert short >= {2, 3, 4}  # the second climb's: batches of short contexts only
    assert any(s.prefill_context and s.decode_seqs for s in samples)  # a long prompt's later chunk beside decodes
    assert all(s.seconds > 0 for s in samples)  # timings only: a tiny model's coefficients are noise


@pytest.mark.slow
def test_pd_calibration_times_each_worker_in_its_process(tmp_path: Path) -> None:
    """The pd graph's prefill and decode workers (two processes) time their own steps (SAGELLM_STEP_TRACE), and each
    gets a model of its own: the prefill worker's from the chunks of prompts of 512 tokens or more."""
    model = make_tiny_llama(tmp_path / "llama", max_position_embeddings=2048)
    config = StepBenchConfig(
        model=str(model),
        max_num_seqs=4,
        max_num_batched_tokens=128,
        threads=1,
        trace_prompt_lens=(8, 40, 600, 900),
        trace_output_lens=(4, 16),
        trace_short_prompt_lens=(8, 24),
        trace_short_output_lens=(4, 8),
        quiet_cores=100.0,
        progress=False,
    )
    workers = calibrate_pd_workers(config)
    assert set(workers) == {"prefill", "decode"}
    prefill, decode = workers["prefill"], workers["decode"]
    assert "the prefill worker's steps" in prefill.model.source["calibrated"]
    assert all(s.prefill_tokens and not s.decode_seqs for s in prefill.samples)  # it only prefills
    assert any(s.decode_seqs and not s.prefill_tokens for s in decode.samples)  # every decode is the decode worker's
    assert sum(decode.steps) == decode.model.source["steps_timed"]
    assert prefill.model.per_decode_seq_s == prefill.model.per_context_token_s == 0.0  # never seen, never fitted
    # Every step prefills, so a step's own cost is one term, the fixed one (which a fit may find ~0 where the
    # kernels' cost is nearly all per token: the CI run this session, native prefill on an AMD CPU)
    assert prefill.model.per_prefill_step_s == 0.0 <= prefill.model.fixed_s


def test_pool_takes_the_median_composition_and_the_mean_time_of_like_steps() -> None:
    steps = [StepSample(0, 4, 400 + i, 0.010 + 0.001 * i) for i in range(3)] + [StepSample(0, 4, 403, 0.019)]
    samples, counts = pool([*steps, StepSample(64, 1, 100, 0.05)])
    assert counts == [1, 4]  # by composition: one decode first
    assert samples[0] == StepSample(64, 1, 100, 0.05)
    assert samples[1] == StepSample(0, 4, 401, pytest.approx(0.0130))  # a slow step counts: the mean, not 0.0115


def test_fit_recovers_known_coefficients() -> None:
    truth = StepModel(
        fixed_s=0.004, per_prefill_token_s=6e-4, per_decode_seq_s=8e-4, per_context_token_s=1.2e-6,
        per_prefill_context_s=3e-7, per_prefill_step_s=0.006,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(200):
        prefill = 0 if rng.random() < 0.4 else int(rng.integers(1, 512))  # decode-only steps and steps with a chunk
        decodes = int(rng.integers(1 if prefill == 0 else 0, 17))
        context, earlier = decodes * int(rng.integers(1, 2048)), prefill * int(rng.integers(0, 1536))
        seconds = truth.step_s(prefill, decodes, context, earlier) * (1 + 0.01 * rng.standard_normal())
        samples.append(StepSample(prefill, decodes, context, seconds, earlier))
    fitted = StepModel.fit(samples, max_num_seqs=16, max_num_batched_tokens=512)
    for name in COEFFICIENTS:
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.05), name
    assert float(np.median(fitted.relative_errors(samples))) < 0.02


def test_fit_separates_a_busy_neighbours_slowdown_from_the_steps_own_time() -> None:
    """Steps that ran beside a neighbour for a random part of their time, 15% slower with a prompt chunk and 5%
    decoding while it computed: fitted on the single steps, the slowdowns are recovered and the linear terms are
    the steps' own time alone; a fit blind to the neighbour would put its average into them."""
    truth = StepModel(
        fixed_s=0.004, per_prefill_token_s=6e-4, per_decode_seq_s=8e-4, per_context_token_s=1.2e-6,
        per_prefill_step_s=0.006, neighbour_prompt_slowdown=0.15, neighbour_decode_slowdown=0.05,
    )  # fmt: skip
    rng = np.random.default_rng(1)
    steps = []
    for _ in range(400):
        prefill = 0 if rng.random() < 0.5 else int(rng.integers(1, 512))
        decodes = int(rng.integers(1 if prefill == 0 else 0, 17))
        busy = float(rng.choice([0.0, 1.0, rng.random()]))
        alone = StepSample(prefill, decodes, decodes * int(rng.integers(1, 2048)), 0.0, neighbour_busy=busy)
        steps.append(dataclasses.replace(alone, seconds=truth.sample_s(alone) * (1 + 0.01 * rng.standard_normal())))
    samples, _ = pool(steps)
    fitted = StepModel.fit(samples, steps)
    assert fitted.neighbour_prompt_slowdown == pytest.approx(0.15, abs=0.01)
    assert fitted.neighbour_decode_slowdown == pytest.approx(0.05, abs=0.01)
    for name in ("fixed_s", "per_prefill_token_s", "per_decode_seq_s", "per_prefill_step_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.1), name
    assert float(np.median(fitted.relative_errors(steps))) < 0.02
    blind = StepModel.fit([dataclasses.replace(s, neighbour_busy=0.0) for s in steps])
    assert blind.neighbour_prompt_slowdown == 0.0 and blind.per_prefill_step_s > 1.05 * truth.per_prefill_step_s


def test_steps_that_never_ran_beside_a_neighbour_fit_no_slowdown() -> None:
    """Too few steps of a kind, or a neighbour busy for the same part of every step, cannot tell a slowdown from
    the steps' own time: none is fitted for them."""
    steps = [StepSample(64, d, 100 * d, 0.01 + 0.001 * d, neighbour_busy=0.5) for d in range(1, 40)]
    steps += [StepSample(0, d, 100 * d, 0.005 + 0.001 * d, neighbour_busy=d % 2) for d in range(1, 10)]
    fitted = StepModel.fit(steps)
    assert fitted.neighbour_prompt_slowdown == 0.0 == fitted.neighbour_decode_slowdown


def test_rescaled_model_scales_decode_and_prompt_work_apart() -> None:
    model = StepModel(
        fixed_s=0.004, per_prefill_token_s=6e-4, per_decode_seq_s=8e-4, per_context_token_s=1e-6,
        per_prefill_context_s=2e-7, per_prefill_step_s=0.006,
    )  # fmt: skip
    scaled = model.rescaled(decode=1.5, prompt=0.5)
    assert scaled.step_s(0, 4, 400) == pytest.approx(1.5 * (0.004 + 4 * 8e-4 + 400 * 1e-6))
    prompt_part = 100 * 6e-4 + 1000 * 2e-7 + 0.006  # 100 tokens after 10 earlier ones each: 1,000 context
    assert scaled.step_s(100, 4, 400, 1000) == pytest.approx(1.5 * model.step_s(0, 4, 400) + 0.5 * prompt_part)


def test_fit_speed_recovers_the_speed_a_run_went_at() -> None:
    """Steps (beside a busy neighbour part of the time) that took 1.2x the model's time for their decode work and
    0.9x for their prompt chunks: both factors come back; with too few decode-only steps (a prefill worker's) one
    factor over all of them."""
    model = StepModel(
        fixed_s=0.004, per_prefill_token_s=6e-4, per_decode_seq_s=8e-4, per_context_token_s=1.2e-6,
        per_prefill_step_s=0.006, neighbour_prompt_slowdown=0.15, neighbour_decode_slowdown=0.05,
    )  # fmt: skip
    truth = model.rescaled(decode=1.2, prompt=0.9)
    rng = np.random.default_rng(2)
    steps = []
    for _ in range(100):
        prefill = 0 if rng.random() < 0.5 else int(rng.integers(1, 512))
        decodes = int(rng.integers(1 if prefill == 0 else 0, 17))
        step = StepSample(prefill, decodes, 300 * decodes, 0.0, neighbour_busy=float(rng.random()))
        steps.append(dataclasses.replace(step, seconds=truth.sample_s(step)))
    assert fit_speed(model, steps) == pytest.approx((1.2, 0.9))
    prompts = [s for s in steps if s.prefill_tokens][:20] + [s for s in steps if not s.prefill_tokens][:3]
    overall = sum(s.seconds for s in prompts) / sum(model.sample_s(s) for s in prompts)
    assert fit_speed(model, prompts) == pytest.approx((overall, overall))
    with pytest.raises(ValueError, match="need measured steps"):
        fit_speed(model, [])


def test_busy_fraction_is_the_part_of_a_step_another_engine_computed() -> None:
    def step(started: float, ended: float) -> TimedStep:
        return TimedStep(started, ended, 0, 1, 10, 0, True)

    others = [step(0.0, 1.0), step(1.5, 2.0), step(2.2, 5.0)]
    starts = np.array([o.started for o in others])
    assert busy_fraction(0.5, 1.5, others, starts) == pytest.approx(0.5)
    assert busy_fraction(1.0, 2.2, others, starts) == pytest.approx(0.5 / 1.2)
    assert busy_fraction(3.0, 4.0, others, starts) == pytest.approx(1.0)  # inside a step that began before it
    assert busy_fraction(5.0, 6.0, others, starts) == 0.0 == busy_fraction(1.0, 1.0, others, starts)


def test_fit_keeps_coefficients_non_negative() -> None:
    # Decodes that look free (noise): the negative slope is dropped, not kept.
    samples = [StepSample(p, d, 100 * d, 0.001 + 1e-5 * p - 1e-6 * d) for p in (0, 64, 256) for d in (1, 8, 16)]
    fitted = StepModel.fit(samples)
    assert all(getattr(fitted, name) >= 0 for name in COEFFICIENTS)
    assert fitted.per_prefill_token_s == pytest.approx(1e-5, rel=0.2)


def test_fit_needs_enough_steps() -> None:
    """As many steps as the terms they exercise: prompt-only steps leave the decode terms out (a prefill worker),
    and their once-a-prefill-step cost is the fixed one."""
    with pytest.raises(ValueError, match="at least 2 measured steps"):
        StepModel.fit([StepSample(8, 0, 0, 0.01)])
    with pytest.raises(ValueError, match="at least 5 measured steps"):
        StepModel.fit([StepSample(8, 2, 40, 0.01, prefill_context=8)] * 4)
    with pytest.raises(ValueError, match="at least 6 measured steps"):
        StepModel.fit([StepSample(8, 2, 40, 0.01, prefill_context=8)] * 4 + [StepSample(0, 2, 40, 0.01)])
    prefill_only = StepModel.fit([StepSample(n, 0, 0, 1e-3 + 1e-5 * n) for n in (16, 64, 256)])
    assert prefill_only.per_prefill_token_s == pytest.approx(1e-5, rel=1e-3) and prefill_only.per_decode_seq_s == 0
    assert prefill_only.fixed_s == pytest.approx(1e-3, rel=1e-3) and prefill_only.per_prefill_step_s == 0


@pytest.mark.parametrize("text", ["not json", json.dumps({"fixed_s": 0.1}), json.dumps([1, 2])])
def test_load_refuses_what_is_not_a_step_model(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"bad\.json is not a step model saved by `sagellm bench steps`"):
        StepModel.load(path)


def test_load_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing.json"):
        StepModel.load(tmp_path / "missing.json")
