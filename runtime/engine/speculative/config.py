"""The speculative decoding settings: vLLM's `--speculative-config` JSON, checked once at engine start so a bad one
is a clear error before any request (FieldError names `speculative_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sagellm.common.errors import FieldError

FIELD = "speculative_config"
MAX_SPECULATIVE_TOKENS = 16  # beyond it a step verifies more rows than any acceptance rate pays for
DEFAULT_LOOKUP = 5  # vLLM's n-gram length when neither lookup length is given
METHODS = ("ngram", "draft_model", "mtp")
HEADS = ("eagle", "eagle3", "medusa", "mlp_speculator")
KNOWN_KEYS = {"method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "adaptive"}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # a proposer's name (proposers.PROPOSERS)
    num_speculative_tokens: int  # k: tokens proposed per sequence and step, at most
    prompt_lookup_max: int  # n-gram: the longest suffix looked up in the sequence's earlier tokens
    prompt_lookup_min: int  # ... and the shortest
    # Ours, not vLLM's: verify only the proposals the measured step costs and acceptance rates pay for (budget.py).
    # False: every proposal, every step, as vLLM does.
    adaptive: bool = True
    model: str | None = None  # draft_model: the draft's path or name (the model cache resolves it)


def parse_speculative_config(raw: dict[str, Any] | None) -> SpeculativeConfig | None:
    """vLLM's keys and defaults: `{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n}` (one of
    the lookup lengths given: the other is the same; neither: both 5, as vLLM's), `{"model": DRAFT,
    "num_speculative_tokens": k}` (method draft_model) or `{"method": "mtp", "num_speculative_tokens": k}` (the
    model's own head). EAGLE, Medusa and MLP heads are refused by name."""
    if raw is None:
        return None
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise FieldError(FIELD, f"{FIELD}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_KEYS))}")
    model = raw.get("model")
    method = raw.get("method", "draft_model" if model is not None else None)
    if method in HEADS:
        raise FieldError(FIELD, f"{FIELD}: method {method!r} (a head trained on the target) is not supported; "
                                f"supported: {', '.join(METHODS)}")  # fmt: skip
    if method not in METHODS:
        raise FieldError(FIELD, f"{FIELD}: unknown method {method!r}; supported: {', '.join(METHODS)}")
    if (method == "draft_model") != (model is not None):
        raise FieldError(FIELD, f'{FIELD}: method draft_model takes a draft "model" (a path or name), and only it')
    if model is not None and not (isinstance(model, str) and model):
        raise FieldError(FIELD, f"{FIELD}: model must be a draft model's path or name, got {model!r}")
    k = _int(raw, "num_speculative_tokens", None)
    if k is None or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise FieldError(FIELD, f"{FIELD}: num_speculative_tokens must be an int in 1..{MAX_SPECULATIVE_TOKENS}, "
                                f"got {raw.get('num_speculative_tokens')!r}")  # fmt: skip
    low = _int(raw, "prompt_lookup_min", None)
    high = _int(raw, "prompt_lookup_max", None)
    if method != "ngram" and (low is not None or high is not None):
        raise FieldError(FIELD, f"{FIELD}: prompt_lookup_min/max are ngram's, not {method}'s")
    if low is None and high is None:
        low = high = DEFAULT_LOOKUP
    low = high if low is None else low
    high = low if high is None else high
    if not 1 <= low <= high:
        raise FieldError(FIELD, f"{FIELD}: needs 1 <= prompt_lookup_min <= prompt_lookup_max, got {low} and {high}")
    adaptive = raw.get("adaptive", True)
    if not isinstance(adaptive, bool):
        raise FieldError(FIELD, f"{FIELD}: adaptive must be true or false, got {adaptive!r}")
    return SpeculativeConfig(method, k, high, low, adaptive, model)


def reads_mtp_head(raw: dict[str, Any] | None) -> bool:
    """Whether these settings have the model's MTP head propose: the model is then loaded with it."""
    spec = parse_speculative_config(raw)
    return spec is not None and spec.method == "mtp"


def _int(raw: dict[str, Any], key: str, default: int | None) -> int | None:
    value = raw.get(key, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise FieldError(FIELD, f"{FIELD}: {key} must be an int, got {value!r}")
    return value
