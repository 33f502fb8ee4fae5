"""The request traces the simulator replays: when each request arrives and how many prompt and output tokens it has.

Every generator is seeded and vectorised (numpy draws the whole trace at once: 10^6 requests in a fraction of a
second), and a `Trace` is plain arrays, so the simulator reads request `i` by index and its results come back in the
same order. `from_rows` wraps arrivals and lengths measured elsewhere (a run on the real engine), so the simulator
can replay exactly what the engine served."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from sagellm.common.errors import InvalidInput


@dataclass(frozen=True)
class Trace:
    """Request `i` arrives at `arrivals[i]` seconds (sorted, the first at or after 0) with `prompt_tokens[i]` prompt
    tokens and asks for exactly `output_tokens[i]` tokens (both >= 1). `priorities` (lower first) and `ttft_slo_ms`
    feed the priority and SLO-aware policies; None when the trace has none."""

    arrivals: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    name: str = "trace"
    priorities: np.ndarray | None = None
    ttft_slo_ms: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.arrivals)
        columns = {"prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens}
        columns |= {"priorities": self.priorities, "ttft_slo_ms": self.ttft_slo_ms}
        for name, column in columns.items():
            if column is not None and len(column) != n:
                raise InvalidInput(f"trace {self.name!r}: {len(column)} {name} for {n} arrivals")
        if n and (self.arrivals[0] < 0 or np.any(np.diff(self.arrivals) < 0)):
            raise InvalidInput(f"trace {self.name!r}: arrivals must be sorted seconds from 0")
        for name in ("prompt_tokens", "output_tokens"):
            if n and int(columns[name].min()) < 1:
                raise InvalidInput(f"trace {self.name!r}: every request needs {name} >= 1")

    def __len__(self) -> int:
        return len(self.arrivals)

    @property
    def duration_s(self) -> float:
        return float(self.arrivals[-1]) if len(self) else 0.0

    @property
    def rate(self) -> float:
        """Mean arrivals per second over the trace."""
        return (len(self) - 1) / self.duration_s if self.duration_s > 0 else math.inf

    def at_rate(self, rate: float) -> Trace:
        """The same requests with time stretched so they arrive at `rate` req/s on average: the same burst shape
        at another load (the generators' arrivals scale exactly so with the rate they are drawn at)."""
        if not rate > 0:
            raise InvalidInput(f"rate must be > 0 req/s, got {rate}")
        return dataclasses.replace(self, arrivals=self.arrivals * (self.rate / rate))


@dataclass(frozen=True)
class Lengths:
    """Token counts drawn log-normal around `median` (sigma of the log), rounded and clipped to [low, high]:
    the long right tail of real prompt and output lengths."""

    median: float
    sigma: float
    low: int = 1
    high: int = 8192

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        drawn = rng.lognormal(math.log(self.median), self.sigma, n)
        return np.clip(np.rint(drawn), self.low, self.high).astype(np.int64)


DEFAULT_PROMPT = Lengths(median=512, sigma=0.8, low=16, high=4096)
DEFAULT_OUTPUT = Lengths(median=128, sigma=0.6, low=8, high=1024)
# The 2023 Azure LLM inference traces (AzurePublicDataset, AzureLLMInferenceDataset2023, characterized in Patel et
# al., "Splitwise", ISCA 2024, §III): code has median prompts of 1,500 tokens and median outputs of 13; conversation
# median prompts of 1,020 and outputs of 129. Sigmas are ours, chosen so the spread covers the published samples
# (code prompts from tens to ~7,400 tokens, conversation outputs up to ~470). Rates are the traces' own: 8,819 code
# requests and 19,366 conversation requests in the same ~57-minute window (2.6 and 5.6 req/s).
AZURE = {
    "code": (Lengths(1500, 1.0, 3, 8192), Lengths(13, 0.9, 1, 1024), 2.6),
    "conversation": (Lengths(1020, 0.8, 3, 8192), Lengths(129, 0.8, 1, 2048), 5.6),
}
AZURE_CV = 2.0  # our assumption: the papers show the traces' bursts but publish no coefficient of variation


def poisson(
    n: int,
    rate: float,
    *,
    prompt: Lengths = DEFAULT_PROMPT,
    output: Lengths = DEFAULT_OUTPUT,
    seed: int = 0,
    name: str = "poisson",
) -> Trace:
    """Open-loop Poisson arrivals at `rate` req/s (exponential gaps, coefficient of variation 1)."""
    return _renewal(n, rate, 1.0, prompt, output, seed, name)


def bursty(
    n: int,
    rate: float,
    *,
    cv: float = 4.0,
    prompt: Lengths = DEFAULT_PROMPT,
    output: Lengths = DEFAULT_OUTPUT,
    seed: int = 0,
    name: str = "bursty",
) -> Trace:
    """Arrivals of a Gamma renewal process at mean `rate` req/s whose gaps have coefficient of variation `cv` > 1:
    most gaps are short (requests come in bursts) and a few very long (lulls). Chosen over an on/off modulated
    Poisson because one number sets the burstiness at a fixed mean rate, which is what a sweep varies, and because
    it is the usual model of bursty LLM serving load (AlpaServe, OSDI 2023, sweeps Gamma arrivals by CV)."""
    if cv <= 1:
        raise InvalidInput(f"bursty: cv must be > 1 (1 is Poisson), got {cv}")
    return _renewal(n, rate, cv, prompt, output, seed, name)


def azure(n: int, rate: float | None = None, *, kind: str = "code", cv: float = AZURE_CV, seed: int = 0) -> Trace:
    """A synthetic trace shaped like the 2023 Azure LLM inference trace `kind` ("code" or "conversation"): its
    published median lengths (see `AZURE`) and bursty Gamma arrivals (`cv`), at the trace's own rate unless `rate`
    is given. The trace itself cannot be downloaded here (no network), so this matches its shape, not its rows; a
    downloaded CSV (TIMESTAMP, ContextTokens, GeneratedTokens) goes through `from_rows` instead."""
    if kind not in AZURE:
        raise InvalidInput(f"azure: kind must be one of {sorted(AZURE)}, got {kind!r}")
    prompt, output, own_rate = AZURE[kind]
    return _renewal(n, rate or own_rate, cv, prompt, output, seed, f"azure-{kind}")


TRACE_KINDS = ("poisson", "bursty", "azure-code", "azure-conv")


def named(kind: str, n: int, rate: float, seed: int = 0) -> Trace:
    """The trace a `sagellm simulate --trace` name stands for, with default lengths, at `rate` req/s."""
    if kind == "poisson":
        return poisson(n, rate, seed=seed)
    if kind == "bursty":
        return bursty(n, rate, seed=seed)
    if kind in ("azure-code", "azure-conv"):
        return azure(n, rate, kind="code" if kind == "azure-code" else "conversation", seed=seed)
    raise InvalidInput(f"unknown trace {kind!r}; choose from {', '.join(TRACE_KINDS)}")


def from_rows(
    arrivals: np.ndarray | list[float],
    prompt_tokens: np.ndarray | list[int],
    output_tokens: np.ndarray | list[int],
    *,
    priorities: np.ndarray | list[int] | None = None,
    ttft_slo_ms: np.ndarray | list[float] | None = None,
    name: str = "rows",
) -> Trace:
    """A trace of given requests, in the given order (results come back indexed alike); arrivals must already be
    sorted seconds from 0."""
    return Trace(
        arrivals=np.asarray(arrivals, dtype=np.float64),
        prompt_tokens=np.asarray(prompt_tokens, dtype=np.int64),
        output_tokens=np.asarray(output_tokens, dtype=np.int64),
        name=name,
        priorities=None if priorities is None else np.asarray(priorities, dtype=np.int64),
        ttft_slo_ms=None if ttft_slo_ms is None else np.asarray(ttft_slo_ms, dtype=np.float64),
    )


def with_classes(trace: Trace, shares: list[tuple[float, int, float]], seed: int = 0) -> Trace:
    """The trace with each request given a (priority, TTFT SLO ms) class drawn by `shares`: (share, priority,
    ttft_slo_ms) per class, shares summing to 1."""
    weights = np.array([share for share, _, _ in shares])
    if not math.isclose(float(weights.sum()), 1.0):
        raise InvalidInput(f"class shares must sum to 1, got {float(weights.sum()):g}")
    picked = np.random.default_rng(seed).choice(len(shares), size=len(trace), p=weights)
    priorities = np.array([priority for _, priority, _ in shares], dtype=np.int64)[picked]
    slos = np.array([slo for _, _, slo in shares], dtype=np.float64)[picked]
    return from_rows(
        trace.arrivals, trace.prompt_tokens, trace.output_tokens, priorities=priorities, ttft_slo_ms=slos,
        name=trace.name,
    )  # fmt: skip


def _renewal(n: int, rate: float, cv: float, prompt: Lengths, output: Lengths, seed: int, name: str) -> Trace:
    """A renewal process: Gamma gaps of mean 1/rate and coefficient of variation cv (cv 1: exponential)."""
    if n < 1:
        raise InvalidInput(f"{name}: need at least one request, got {n}")
    if not rate > 0:
        raise InvalidInput(f"{name}: rate must be > 0 req/s, got {rate}")
    rng = np.random.default_rng(seed)
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / (rate * shape), n - 1)
    arrivals = np.concatenate(([0.0], np.cumsum(gaps)))
    return Trace(arrivals, prompt.sample(rng, n), output.sample(rng, n), name=name)
