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
engine by `sagellm bench steps`, which saves the model as JSON with the machine and model it was measured on.

Engines that share a machine slow each other: two PD workers on one host share its memory bandwidth, caches and the
cores their processes' other threads run on. A step takes `1 + neighbour_prompt_slowdown` (a step with prompt chunks)
or `1 + neighbour_decode_slowdown` (decode only) times its modelled time while another engine on its host computes.
The calibration of such workers records what fraction of each step the other one was computing (`neighbour_busy`),
which separates the two: the linear terms are an engine's steps alone, the slowdowns what a busy neighbour adds. A
model blind to it fits the mix of steps alone and beside a neighbour that its calibration happened to run, and is
wrong for a trace that runs them side by side more often (a decode worker's short prompts beside the prefill worker's
long ones)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sagellm.common.errors import InvalidInput

MIN_SLOWDOWN_STEPS = 16  # steps of a kind needed to fit its neighbour slowdown ...
MIN_BUSY_SPREAD = 0.1  # ... and the spread (standard deviation) of their neighbour's busy fractions
MIN_SPEED_STEPS = 8  # steps of each kind (with prompt chunks, decode only) to tell their speeds apart
DECODE_TERMS = ("fixed_s", "per_decode_seq_s", "per_context_token_s")  # a step's work without prompt chunks ...
PROMPT_TERMS = ("per_prefill_token_s", "per_prefill_context_s", "per_prefill_step_s")  # ... and its prompt chunks'
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


def fit_neighbour_slowdown(model: StepModel, steps: list[StepSample]) -> float:
    """The relative slowdown a busy neighbour adds to `steps` (of one kind: with prompt chunks, or decode only),
    given `model`'s linear terms: the least-squares line of measured / modelled time against the fraction of the step
    the neighbour computed, `1 + k + c * busy`, read as a slowdown of `c / (1 + k)` over the steps' own time alone
    (`1 + k`: what the linear terms miss for this kind anyway). 0 when the steps' overlaps do not vary enough to tell
    (fewer than `MIN_SLOWDOWN_STEPS`, or all alike), and never below 0."""
    if len(steps) < MIN_SLOWDOWN_STEPS:
        return 0.0
    busy = np.array([s.neighbour_busy for s in steps])
    if busy.std() < MIN_BUSY_SPREAD:
        return 0.0
    ratio = np.array([s.seconds / model.alone_s(s) for s in steps])
    (slope, level), *_ = np.linalg.lstsq(np.stack([busy, np.ones_like(busy)], 1), ratio - 1, rcond=None)
    return max(0.0, float(slope / (1 + level))) if 1 + level > 0 else 0.0


def fit_speed(model: StepModel, steps: list[StepSample]) -> tuple[float, float]:
    """How many times their modelled time `steps` took for their decode work and for their prompt work: the speed a
    run went at against the model. A shared machine's speed drifts by 10-20% within a minute (other tenants of its
    host, whose load no counter in the guest shows), so a run simulated with the model as calibrated carries that
    drift in its error; rescaled (`rescaled`) to the run's speed it shows the simulator's own. Totals, since a
    run's latency is a sum of steps: the decode factor makes the decode-only steps' modelled total their measured
    one; the prompt factor then does the same for the steps with prompt chunks, their decode part taken at the
    decode factor. With fewer than `MIN_SPEED_STEPS` of a kind (a prefill worker never decodes alone), or a prompt
    factor the steps' decode part leaves no room for, one factor over all the steps serves for both."""
    if not steps:
        raise InvalidInput("need measured steps to tell their speed")
    measured = np.array([s.seconds for s in steps])
    decode_part = np.array([model.decode_part_s(s) * model.neighbour_factor(s) for s in steps])
    modelled = np.array([model.sample_s(s) for s in steps])
    overall = float(measured.sum() / modelled.sum())
    prompt = np.array([s.prefill_tokens > 0 for s in steps])
    if min(prompt.sum(), (~prompt).sum()) < MIN_SPEED_STEPS:
        return overall, overall
    decode = float(measured[~prompt].sum() / modelled[~prompt].sum())
    prompt_part = modelled[prompt].sum() - decode_part[prompt].sum()
    left = measured[prompt].sum() - decode * decode_part[prompt].sum()
    if prompt_part <= 0 or left <= 0:
        return overall, overall
    return decode, float(left / prompt_part)


@dataclass(frozen=True)
class StepSample:
    """One measured step."""

    prefill_tokens: int
    decode_seqs: int
    context_tokens: int
    seconds: float
    prefill_context: int = 0  # prompt chunks' tokens x the earlier prompt tokens each attends over, summed
    neighbour_busy: float = 0.0  # the fraction of it during which another engine on the same host computed


@dataclass(frozen=True)
class StepModel:
    fixed_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_context_token_s: float
    per_prefill_context_s: float = 0.0
    per_prefill_step_s: float = 0.0
    neighbour_prompt_slowdown: float = 0.0  # a step with prompt chunks takes 1 + this times as long beside a busy ...
    neighbour_decode_slowdown: float = 0.0  # ... neighbour on its host, a decode-only step 1 + this
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

    def decode_part_s(self, sample: StepSample) -> float:
        """The part of a measured step's modelled time alone that is not its prompt chunks' (`DECODE_TERMS`)."""
        return self.step_s(0, sample.decode_seqs, sample.context_tokens)

    def rescaled(self, decode: float, prompt: float) -> StepModel:
        """This model on a machine that takes `decode` times as long for the decode terms and `prompt` times as long
        for the prompt chunks' terms (`fit_speed`)."""
        return replace(
            self,
            **{name: getattr(self, name) * decode for name in DECODE_TERMS},
            **{name: getattr(self, name) * prompt for name in PROMPT_TERMS},
        )

    def neighbour_slowdown(self, prompt: bool) -> float:
        """How much longer a step (`prompt`: one with prompt chunks) takes while a neighbour on its host computes."""
        return self.neighbour_prompt_slowdown if prompt else self.neighbour_decode_slowdown

    def alone_s(self, sample: StepSample) -> float:
        """The modelled time of a measured step's composition, run alone on its host."""
        return self.step_s(sample.prefill_tokens, sample.decode_seqs, sample.context_tokens, sample.prefill_context)

    def neighbour_factor(self, sample: StepSample) -> float:
        """How many times its time alone a measured step takes for the part of it its neighbour computed."""
        return 1 + self.neighbour_slowdown(sample.prefill_tokens > 0) * sample.neighbour_busy

    def sample_s(self, sample: StepSample) -> float:
        """The modelled time of a measured step: its composition's, slowed for the part its neighbour computed."""
        return self.alone_s(sample) * self.neighbour_factor(sample)

    @classmethod
    def fit(cls, samples: list[StepSample], steps: list[StepSample] | None = None, **settings: Any) -> StepModel:
        """Least squares of the relative error over the samples, with every coefficient >= 0 (a coefficient the
        data would make negative is dropped and the rest refitted: no step gets faster for doing more). Relative,
        because a 5 ms decode step and a 300 ms prefill matter alike: TPOT is made of the one, TTFT of the other;
        plain least squares would fit the prefills and leave decode steps twice their time. `settings`:
        max_num_seqs, max_num_batched_tokens, source.

        When the steps ran beside a neighbour (`neighbour_busy`), the slowdowns are fitted too: the linear terms
        first, then each slowdown from how its steps' time grows with the time their neighbour computed
        (`fit_neighbour_slowdown`), then the linear terms again on the steps' times with that slowdown taken out.
        `steps`: the single steps `samples` pooled, when they were pooled (`sagellm bench steps` pools like steps
        so that every composition weighs alike): the slowdowns are fitted on them, a step an observation, since a
        pooled sample's mean overlap no longer says which of its steps ran beside the neighbour."""
        if not samples or min(s.seconds for s in samples) <= 0:
            raise InvalidInput("need measured steps, each taking > 0 seconds")
        model = cls._fit_linear(samples, **settings)
        steps = samples if steps is None else steps
        if not any(s.neighbour_busy for s in steps):
            return model
        slowdowns = {
            name: fit_neighbour_slowdown(model, [s for s in steps if (s.prefill_tokens > 0) == prompt])
            for name, prompt in (("neighbour_prompt_slowdown", True), ("neighbour_decode_slowdown", False))
        }
        slowed = replace(model, **slowdowns)
        alone = [replace(s, seconds=s.seconds / slowed.neighbour_factor(s), neighbour_busy=0.0) for s in samples]
        return replace(cls._fit_linear(alone, **settings), **slowdowns)

    @classmethod
    def _fit_linear(cls, samples: list[StepSample], **settings: Any) -> StepModel:
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
            raise InvalidInput(f"need at least {len(used)} measured steps to fit, got {len(samples)}")
        weight = np.array([1 / s.seconds for s in samples])  # row i / seconds_i: residuals become relative errors
        coefficients = np.zeros(x.shape[1])
        coefficients[used] = fit_non_negative(x[:, used] * weight[:, None], np.ones(len(samples)))
        return cls(**dict(zip(COEFFICIENTS, coefficients.tolist())), **settings)

    def relative_errors(self, samples: list[StepSample]) -> np.ndarray:
        """|predicted - measured| / measured of each sample."""
        predicted = np.array([self.sample_s(s) for s in samples])
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
            raise InvalidInput(f"{path} is not a step model saved by `sagellm bench steps`: {error}") from None
