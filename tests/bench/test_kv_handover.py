"""The KV hand-over calibration on a tiny random Llama: the real PD graph (two worker processes) serves one request
at a time, each hand-over is measured, and the fit is the simulator's `KVTransferModel`. Nothing here is timed."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm.benchmarks.kv_handover import calibrate_kv_handover
from tests.tiny_models import make_tiny_llama

LENGTHS = (16, 64, 256)


@pytest.mark.slow
def test_every_hand_over_is_measured_and_fitted(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny-llama", max_position_embeddings=1024)
    calibration = calibrate_kv_handover(str(model), lengths=LENGTHS, rounds=2, progress=False)
    assert sorted(n for n, _ in calibration.samples) == sorted(LENGTHS * 2)  # the warm-up request left out
    assert all(0 < seconds < 30 for _, seconds in calibration.samples)
    fitted = calibration.model
    assert fitted.latency_s >= 0 and fitted.per_token_s >= 0 and fitted.seconds(256) > 0
