"""How long one engine step takes, as a function of what the step computes: the simulator's model of an instance.

An engine step (continuous batching, chunked prefill) runs a batch of decode sequences, one token each, and up to
`max_num_batched_tokens` of prompt chunks. Its time is modelled as linear in the work it does:

    step_s = fixed_s + per_prefill_token_s * prefill_tokens + per_decode_seq_s * decode_seqs
             + per_context_token_s * context_tokens + per_prefill_context_s * prefill_context
             + per_prefill_step_s * (prefill_tokens > 0)

where `context_tokens` is the KV the decode sequences attend over (their context lengths, summed), the part of a
decode step that grows with the conversation, and `prefill_context` the same for prompt chunks: each chunk's tokens
times the earlier tokens of its prompt they attend over (a 512-token chunk after 1,536 cached tokens costs nearly
twice the first chunk), a separate coefficient because a chunk's attention is a matrix product, a decode's a read.
A step that computes any prompt tokens also pays `per_prefill_step_s` once: the prompt chunks' own path through the
model (their attention, the cache writes of whole blocks), which a 16-token chunk costs nearly as much as a 512-token
one; without it a short prompt's step beside the decodes came out ~15% short.
The coefficients are fitted (least squares of the relative error, each kept >= 0) to step times measured on our own
engine by `sagellm bench steps`, which saves the model as JSON with the machine and model it was measured on."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

COEFFICIENTS = (
    "fixed_s",
    "per_prefill_token_s",
    "per_decode_seq_s",
    "per_context_token_s",
    "per_prefill_context_s",
    "per_prefill_step_s",
)


def fit_non_negative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares `x @ c ~ y` with every coefficient >= 0: while one comes out negative, the most negative is
    dropped (fixed at 0) and the rest refitted, so no modelled time falls as the work grows."""
    kept = list(range(x.shape[1]))
    while True:
        solution, *_ = np.linalg.lstsq(x[:, kept], y, rcond=None)
        if (solution >= 0).all() or len(kept) == 1:
            break
        kept.pop(int(np.argmin(solution)))
    coefficients = np.zeros(x.shape[1])
    coefficients[kept] = np.maximum(solution, 0.0)
    return coefficients


@dataclass(frozen=True)
class StepSample:
    """One measured step."""

    prefill_tokens: int
    decode_seqs: int
    context_tokens: int
    seconds: float
    prefill_context: int = 0  # prompt chunks' tokens x the earlier prompt tokens each attends over, summed


@dataclass(frozen=True)
class StepModel:
    fixed_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_context_token_s: float
    per_prefill_context_s: float = 0.0
    per_prefill_step_s: float = 0.0
    max_num_seqs: int = 16  # the engine's settings when measured: the simulated instance schedules as it did
    max_num_batched_tokens: int = 512
    source: dict[str, Any] | None = None  # where it was measured: cpu, model, threads, date, fit error

    def step_s(self, prefill_tokens: int, decode_seqs: int, context_tokens: int, prefill_context: int = 0) -> float:
        return (
            self.fixed_s
            + self.per_prefill_token_s * prefill_tokens
            + self.per_decode_seq_s * decode_seqs
            + self.per_context_token_s * context_tokens
            + self.per_prefill_context_s * prefill_context
            + (self.per_prefill_step_s if prefill_tokens else 0.0)
        )

    @classmethod
    def fit(cls, samples: list[StepSample], **settings: Any) -> StepModel:
        """Least squares of the relative error over the samples, with every coefficient >= 0 (a coefficient the
        data would make negative is dropped and the rest refitted: no step gets faster for doing more). Relative,
        because a 5 ms decode step and a 300 ms prefill matter alike: TPOT is made of the one, TTFT of the other;
        plain least squares would fit the prefills and leave decode steps twice their time. `settings`:
        max_num_seqs, max_num_batched_tokens, source."""
        if not samples or min(s.seconds for s in samples) <= 0:
            raise ValueError("need measured steps, each taking > 0 seconds")
        x = np.array(
            [
                [1.0, s.prefill_tokens, s.decode_seqs, s.context_tokens, s.prefill_context, float(s.prefill_tokens > 0)]
                for s in samples
            ]
        )
        # A term no sample has (a prefill worker never decodes) is not fitted: it stays 0, as it never counts. When
        # every sample computes prompt tokens (a prefill worker again) the once-a-prefill-step term is the fixed one
        # under another name: fixed_s holds both, rather than an arbitrary split of their sum.
        step = COEFFICIENTS.index("per_prefill_step_s")
        used = [j for j in range(x.shape[1]) if x[:, j].any() and not (j == step and x[:, step].all())]
        if len(samples) < len(used):
            raise ValueError(f"need at least {len(used)} measured steps to fit, got {len(samples)}")
        weight = np.array([1 / s.seconds for s in samples])  # row i / seconds_i: residuals become relative errors
        coefficients = np.zeros(x.shape[1])
        coefficients[used] = fit_non_negative(x[:, used] * weight[:, None], np.ones(len(samples)))
        return cls(**dict(zip(COEFFICIENTS, coefficients.tolist())), **settings)

    def relative_errors(self, samples: list[StepSample]) -> np.ndarray:
        """|predicted - measured| / measured of each sample."""
        predicted = np.array(
            [self.step_s(s.prefill_tokens, s.decode_seqs, s.context_tokens, s.prefill_context) for s in samples]
        )
        measured = np.array([s.seconds for s in samples])
        return np.abs(predicted - measured) / measured

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> StepModel:
        """Raises ValueError naming the file when it is not a step model."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path} is not a step model saved by `sagellm bench steps`: {error}") from None
