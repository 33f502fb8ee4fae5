"""How long a prefill worker's KV takes to reach the decode worker: the simulator's model of a PD hand-over.

The hand-over runs from the prefill worker's first token to the decode worker's: the prompt's KV (gathered into
shared memory on one host by the prefill step) is sent over ZeroMQ, and the decode worker copies it into its paged
cache between two of its steps, then emits the first token. The first part is a fixed time, the second bytes:

    seconds = latency_s + per_token_s * prompt_tokens

fitted (least squares, both >= 0) to hand-overs measured on the real PD graph (`RequestMetrics.kv_handover_s`) with
nothing else running. The simulator spends `latency_s` in transit and `per_token_s` on the decode instance's time,
which its other sequences wait for."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sagellm.common.errors import InvalidInput
from sagellm.simulator.step_model import fit_non_negative


@dataclass(frozen=True)
class KVTransferModel:
    latency_s: float = 0.0
    per_token_s: float = 0.0

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.per_token_s < 0:
            raise InvalidInput(f"a KV hand-over takes >= 0 s, got {self.latency_s} s + {self.per_token_s} s/token")

    def seconds(self, prompt_tokens: int) -> float:
        return self.latency_s + self.per_token_s * prompt_tokens

    @classmethod
    def fit(cls, samples: list[tuple[int, float]]) -> KVTransferModel:
        """From (prompt tokens, seconds) of measured hand-overs; a coefficient the data would make negative is
        dropped and the other refitted (no hand-over gets faster for moving more)."""
        if len(samples) < 2:
            raise InvalidInput(f"need at least 2 measured hand-overs to fit, got {len(samples)}")
        tokens = np.array([float(n) for n, _ in samples])
        seconds = np.array([s for _, s in samples])
        latency, per_token = fit_non_negative(np.stack([np.ones_like(tokens), tokens], 1), seconds).tolist()
        return cls(latency, per_token)
