"""`sagellm bench steps` on a tiny random Llama: the steps it times are the compositions it meant (read from the
scheduler's batch), and the fitted `StepModel` is sane and survives its file; `StepModel.fit` itself on synthetic
steps whose coefficients are known; a file that is not a step model is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sagellm.benchmarks.step_times import StepBenchConfig, calibrate, planned_samples, write_results
from sagellm.simulator.step_model import COEFFICIENTS, StepModel, StepSample
from tests.tiny_models import make_tiny_llama

TINY = dict(
    max_num_seqs=4,
    max_num_batched_tokens=64,
    threads=1,
    context_lens=(16, 96),
    chunk_sizes=(8, 32, 64),
    mixed_batch_sizes=(1, 3),
    mixed_chunk_sizes=(8, 64),
    repeats=3,
    window_s=0.0,  # the tiny model's steps take a millisecond: the timing windows the real model gets cost seconds
    retries=0,
    progress=False,
)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory):
    model = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
    return calibrate(StepBenchConfig(model=str(model), **TINY))


def test_calibration_times_the_compositions_it_builds(calibration) -> None:
    config = StepBenchConfig(model="", **TINY)
    assert len(calibration.samples) == planned_samples(config)
    by_kind = {
        kind: [s for s, k in zip(calibration.samples, calibration.kinds) if k == kind] for kind in calibration.kinds
    }
    assert sorted(s.prefill_tokens for s in by_kind["prefill"]) == [8, 32, 64]
    assert all(s.decode_seqs == 0 and s.context_tokens == 0 for s in by_kind["prefill"])
    # Requests join one by one: every batch size at both context lengths, each decode's context at least its prompt.
    assert [s.decode_seqs for s in by_kind["decode"]] == [1, 2, 3, 4] * 2
    assert all(s.prefill_tokens == 0 and s.context_tokens > 16 * s.decode_seqs for s in by_kind["decode"])
    # Beside 3 decodes a 64-token chunk is cut to the 61 tokens the budget leaves.
    assert {(s.decode_seqs, s.prefill_tokens) for s in by_kind["mixed"]} == {(1, 8), (1, 63), (3, 8), (3, 61)}
    assert all(s.seconds > 0 for s in calibration.samples)


def test_calibrated_model_is_sane_and_round_trips(calibration, tmp_path: Path) -> None:
    model = calibration.model
    assert all(getattr(model, name) >= 0 for name in COEFFICIENTS)
    assert model.per_prefill_token_s > 0  # a 64-token prompt costs more than an 8-token one on any machine
    assert (model.max_num_seqs, model.max_num_batched_tokens) == (4, 64)
    errors = calibration.errors()
    assert np.median(errors) < 0.25, f"fit error p50 {np.median(errors):.1%} on its own samples"
    assert model.source["samples"] == len(calibration.samples) and model.source["cpu"]

    write_results(calibration, tmp_path / "model.json", tmp_path / "samples.json")
    assert StepModel.load(tmp_path / "model.json") == model
    rows = json.loads((tmp_path / "samples.json").read_text())["samples"]
    assert [row["kind"] for row in rows] == calibration.kinds


def test_fit_recovers_known_coefficients() -> None:
    truth = StepModel(fixed_s=0.004, per_prefill_token_s=6e-4, per_decode_seq_s=8e-4, per_context_token_s=1.2e-6)
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(200):
        prefill, decodes = int(rng.integers(0, 512)), int(rng.integers(0, 17))
        context = decodes * int(rng.integers(1, 2048))
        seconds = truth.step_s(prefill, decodes, context) * (1 + 0.01 * rng.standard_normal())
        samples.append(StepSample(prefill, decodes, context, seconds))
    fitted = StepModel.fit(samples, max_num_seqs=16, max_num_batched_tokens=512)
    for name in COEFFICIENTS:
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.05), name
    assert float(np.median(fitted.relative_errors(samples))) < 0.02


def test_fit_keeps_coefficients_non_negative() -> None:
    # Decodes that look free (noise): the negative slope is dropped, not kept.
    samples = [StepSample(p, d, 100 * d, 0.001 + 1e-5 * p - 1e-6 * d) for p in (0, 64, 256) for d in (1, 8, 16)]
    fitted = StepModel.fit(samples)
    assert all(getattr(fitted, name) >= 0 for name in COEFFICIENTS)
    assert fitted.per_prefill_token_s == pytest.approx(1e-5, rel=0.2)


def test_fit_needs_enough_steps() -> None:
    with pytest.raises(ValueError, match="at least 5 measured steps"):
        StepModel.fit([StepSample(8, 0, 0, 0.01)])


@pytest.mark.parametrize("text", ["not json", json.dumps({"fixed_s": 0.1}), json.dumps([1, 2])])
def test_load_refuses_what_is_not_a_step_model(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"bad\.json is not a step model saved by `sagellm bench steps`"):
        StepModel.load(path)


def test_load_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing.json"):
        StepModel.load(tmp_path / "missing.json")
