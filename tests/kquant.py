"""Test-only sample weights for the K-quant encoders (sagellm.benchmarks.kquant_pack): values whose every field of a
block varies, which a kernel's mistake would show on."""

from __future__ import annotations

import numpy as np


def sample_weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """fp32 [rows, cols] whose 16- and 32-input runs differ in spread and centre, so sub-block scales and mins take
    many values, and some runs are all positive or all negative (min 0, or a scale's sign flipped)."""
    rng = np.random.default_rng(seed)
    runs = cols // 16
    spread = rng.uniform(0.002, 0.2, (rows, runs, 1)).astype(np.float32)
    centre = rng.uniform(-0.15, 0.15, (rows, runs, 1)).astype(np.float32)
    values = rng.standard_normal((rows, runs, 16)).astype(np.float32) * spread + centre
    return values.reshape(rows, cols)
