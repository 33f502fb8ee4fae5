"""How one request wants its tokens chosen and when its generation stops.

The field names and meanings follow vLLM's `SamplingParams` so OpenAI-style requests and vLLM users' code map onto it
one to one. Every value is checked once, here, when the request enters the system: the sampler and the detokenizer
trust it and never re-validate. A bad value raises `ValueError` naming the field and the allowed range, which the
gateway turns into an `invalid_request` error.

Every entry point (`LLM`, the CLI, the graph's sources, the gateway) builds a request's settings one way,
`SamplingParams.with_defaults`: what the request gave, else the model's own defaults (its generation config), else
this class's, which are vLLM's and OpenAI's (temperature 1, top_p 1, no top_k or min_p) with no `max_tokens` bound but
the context. The one exception is the OpenAI API's own: /v1/completions defaults `max_tokens` to 16.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagellm.common.errors import FieldError
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.request_limits import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)
from sagellm.runtime.engine.thinking import ThinkingBudget
from sagellm.runtime.models.loaded import ModelLoadError

# The output a request without max_tokens is expected to produce: a typical answer, not the context limit. Route,
# the policies and the engines' load reports all predict decode work with `expected_output_tokens`.
EXPECTED_OUTPUT_TOKENS = 256
MAX_LOGPROBS = 20  # the most top-N alternatives a request may ask for, as vLLM's default `max_logprobs`
MAX_CHOICES = 16  # the most choices (n, best_of) one request may ask for: each is a sequence of its own
GREEDY_TEMPERATURE = 1e-5  # below this, temperature is greedy (vLLM's _SAMPLING_EPS): dividing by ~0 is pointless
_SEED_MIN, _SEED_END = -(2**63), 2**64  # the range torch.Generator.manual_seed accepts
# Integers stay below 2**63, so every value fits the wire's 64-bit msgpack integers when a request crosses processes.
INT_END = 2**63
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI's and vLLM's
MAX_LOGIT_BIAS = 100.0  # a logit bias is clamped to [-100, 100], as OpenAI's and vLLM's


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise FieldError(name, f"{name} must be {rule}, got {_shown(value)}")


def _require_at_most(name: str, count: int, cap: int, what: str) -> None:
    """A list or map over its cap (`request_limits`) is refused by its size, before any of its items is read."""
    if count > cap:
        raise FieldError(name, f"{name} must hold at most {cap} {what}, got {count}")


def _require_list(
    name: str, values: Any, rule: str, cap: int, what: str, valid: Callable[[Sequence[Any]], bool]
) -> list[Any]:
    """A list field's checks in their order: a list at all, then its size against its cap (before any item is read),
    then its items (`valid` over the whole list); a copy of it as a list."""
    _require(isinstance(values, (list, tuple)), name, rule, values)
    _require_at_most(name, len(values), cap, what)
    _require(valid(values), name, rule, values)
    return list(values)


def _shown(value: object) -> str:
    """A refused value as an error shows it: its repr, cut short (a refused list may hold thousands of items)."""
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_id(value: object) -> bool:
    return _is_int(value) and 0 <= value < INT_END  # type: ignore[operator]


def _is_token_ids(values: object) -> bool:
    return isinstance(values, (list, tuple)) and all(map(_is_token_id, values))


def _is_some_token_ids(values: Sequence[Any]) -> bool:
    return len(values) > 0 and _is_token_ids(values)


def _are_strings(values: Sequence[Any]) -> bool:
    return all(isinstance(s, str) and s for s in values)


def _are_words(values: Sequence[Any]) -> bool:
    """Strings that are not blank."""
    return all(isinstance(w, str) and w and not w.isspace() for w in values)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    n: int = 1  # choices per prompt: the prompt is prefilled once, each choice samples its own tokens (`choice`)
    max_tokens: int | None = None  # None: generate up to the model's context limit
    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1: off
    min_p: float = 0.0  # drop tokens less likely than min_p * (probability of the most likely token)
    seed: int | None = None  # per-request RNG: the same seed gives the same tokens whatever shares the batch
    stop: str | list[str] | None = None  # normalized to a list of non-empty strings
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives per token; 0: only the sampled token's logprob
    prompt_logprobs: int | None = None  # the same for every prompt token but the first (given the ones before it)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    guided: GuidedDecoding | None = None  # what the output is constrained to (a JSON schema, a regex, ...)
    thinking: ThinkingBudget | None = None  # a reasoning model's thinking closed after this many tokens
    # What the sampler does to the logits before choosing (vLLM's, applied in its order: `penalties.py`).
    presence_penalty: float = 0.0  # minus this from every token already in the output
    frequency_penalty: float = 0.0  # minus this times the token's count in the output
    repetition_penalty: float = 1.0  # a token of the prompt or output: a logit > 0 divided by it, else multiplied
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (clamped to [-100, 100])
    min_tokens: int = 0  # EOS and the stop token ids are never chosen before this many output tokens
    bad_words: list[str] = field(default_factory=list)  # never generated, with or without a leading space
    # The bad words as the model's token id sequences (`penalties.bad_word_token_ids`), filled where the prompt is
    # tokenized (admission, or the gateway in a worker thread), as vLLM's front end fills its own; None: the engine
    # tokenizes them itself (an offline request).
    bad_words_token_ids: list[list[int]] | None = None
    allowed_token_ids: list[int] | None = None  # only these token ids are ever chosen

    def __post_init__(self) -> None:
        _require(_is_int(self.n) and 1 <= self.n <= MAX_CHOICES, "n", f"an integer in [1, {MAX_CHOICES}]", self.n)
        _require(
            self.max_tokens is None or (_is_int(self.max_tokens) and 1 <= self.max_tokens < INT_END),
            "max_tokens",
            "an integer in [1, 2**63) or None",
            self.max_tokens,
        )
        _require(_is_number(self.temperature) and self.temperature >= 0, "temperature", ">= 0", self.temperature)
        _require(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _require(
            _is_int(self.top_k) and -1 <= self.top_k < INT_END, "top_k", "-1 or 0 (off) or an integer >= 1", self.top_k
        )
        _require(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _require(
            self.seed is None or (_is_int(self.seed) and _SEED_MIN <= self.seed < _SEED_END),
            "seed",
            "None or an integer in [-2**63, 2**64)",
            self.seed,
        )
        self.stop = self._normalize_stop(self.stop)
        self.stop_token_ids = self._normalize_stop_token_ids(self.stop_token_ids)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(
                value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS),
                name,
                f"None or an integer in [0, {MAX_LOGPROBS}]",
                value,
            )
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _require(isinstance(getattr(self, name), bool), name, "a bool", getattr(self, name))
        if isinstance(self.guided, Mapping):  # vLLM's GuidedDecodingParams written as a dict
            self.guided = GuidedDecoding(**self.guided)
        guided = self.guided
        _require(guided is None or isinstance(guided, GuidedDecoding), "guided", "a GuidedDecoding", guided)
        if isinstance(self.thinking, Mapping):
            self.thinking = ThinkingBudget(**self.thinking)
        _require(self.thinking is None or isinstance(self.thinking, ThinkingBudget), "thinking", "a ThinkingBudget",
                 self.thinking)  # fmt: skip
        if self.thinking is not None and guided is not None:
            raise FieldError("thinking_budget", "a thinking budget and a constrained output cannot go together")
        self._check_logit_adjustments()

    def _check_logit_adjustments(self) -> None:
        """The penalties, biases and token restrictions (vLLM's ranges); token ids against the vocabulary are
        checked where it is known (`prompt.sampling_token_problem`)."""
        bound = f"in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_number(value) and abs(value) <= MAX_PENALTY, name, bound, value)
        penalty = self.repetition_penalty
        _require(_is_number(penalty) and penalty > 0, "repetition_penalty", "a finite number > 0 (1: off)", penalty)
        self.logit_bias = self._normalize_logit_bias(self.logit_bias)
        least = self.min_tokens
        _require(_is_int(least) and 0 <= least < INT_END, "min_tokens", "an integer >= 0", least)
        if self.max_tokens is not None:
            _require(least <= self.max_tokens, "min_tokens", f"<= max_tokens ({self.max_tokens})", least)
        self.bad_words = self._normalize_bad_words(self.bad_words)
        sequences = self.bad_words_token_ids
        _require(
            sequences is None or (isinstance(sequences, list) and all(_is_token_ids(s) and s for s in sequences)),
            "bad_words_token_ids",
            "None or a list of non-empty lists of token ids",
            sequences,
        )
        allowed = self.allowed_token_ids
        if allowed is not None:
            rule = "None or a non-empty list of token ids (integers >= 0)"
            self.allowed_token_ids = _require_list(
                "allowed_token_ids", allowed, rule, MAX_ALLOWED_TOKEN_IDS, "token ids", _is_some_token_ids
            )

    @staticmethod
    def _normalize_bad_words(words: Any) -> list[str]:
        if words is None:
            return []
        rule = "a list of strings that are not blank"
        words = _require_list("bad_words", words, rule, MAX_BAD_WORDS, "words", _are_words)
        _require_at_most("bad_words", max(map(len, words), default=0), MAX_BAD_WORD_CHARS, "characters per word")
        return words

    @staticmethod
    def _normalize_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        rule = "a non-empty string or a list of non-empty strings"
        stops = [stop] if isinstance(stop, str) and stop else stop  # "" is refused as itself
        stops = _require_list("stop", stops, rule, MAX_STOP_STRINGS, "strings", _are_strings)
        _require_at_most("stop", max(map(len, stops), default=0), MAX_STOP_CHARS, "characters per string")
        return stops

    @staticmethod
    def _normalize_logit_bias(bias: Any) -> dict[int, float] | None:
        """Token ids as integers (JSON's keys are strings: the openai SDK sends `{"123": 5}`), biases clamped to
        [-100, 100]; None when empty."""
        if bias is None:
            return None
        _require(isinstance(bias, Mapping), "logit_bias", "a map of token ids to numbers", bias)
        _require_at_most("logit_bias", len(bias), MAX_LOGIT_BIAS_TOKENS, "token ids")
        normalized: dict[int, float] = {}
        for key, value in bias.items():
            token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
            _require(_is_token_id(token), "logit_bias", "keyed by token ids (integers >= 0)", key)
            _require(_is_number(value), "logit_bias", f"a finite number for token {token}", value)
            normalized[token] = min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, float(value)))
        return normalized or None

    @staticmethod
    def _normalize_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        return _require_list(
            "stop_token_ids", ids, "a list of integers in [0, 2**63)", MAX_STOP_TOKEN_IDS, "token ids", _is_token_ids
        )

    @classmethod
    def with_defaults(cls, model_defaults: Mapping[str, Any] | None = None, **given: Any) -> SamplingParams:
        """A request's settings: the `given` ones that are not None, else the model's (`model_sampling_defaults`),
        else this class's."""
        return cls(**{**(model_defaults or {}), **{k: v for k, v in given.items() if v is not None}})

    def choice(self, index: int) -> SamplingParams:
        """The settings of choice `index` of a request with `n` choices: one sequence, seeded `seed + index` (wrapped
        into the seeds' range), so each choice draws its own tokens, the same on every run and every path; the
        prompt is scored (`prompt_logprobs`) once, by choice 0."""
        seed = self.seed
        if seed is not None:
            seed = (seed + index - _SEED_MIN) % (_SEED_END - _SEED_MIN) + _SEED_MIN
        prompt_logprobs = self.prompt_logprobs if index == 0 else None  # the prompt's are the first choice's
        return dataclasses.replace(self, n=1, seed=seed, prompt_logprobs=prompt_logprobs)

    @property
    def expected_output_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else EXPECTED_OUTPUT_TOKENS

    @property
    def adjusts_logits(self) -> bool:
        """True when a penalty, a bias or a restriction on tokens changes the logits before a token is chosen; a
        batch whose rows all say False costs the sampler nothing for them."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
            or self.bad_words
            or self.allowed_token_ids is not None
        )

    @property
    def asks_logprobs(self) -> bool:
        """True when the request wants token logprobs of its output or its prompt: numbers in our model's
        vocabulary, which servers reached over HTTP do not relay."""
        return self.logprobs is not None or self.prompt_logprobs is not None

    @property
    def is_greedy(self) -> bool:
        """True when the token is the argmax: top_k, top_p, min_p and seed then change nothing."""
        return self.temperature < GREEDY_TEMPERATURE


def model_sampling_defaults(model: Any) -> dict[str, Any]:
    """A loaded model's own sampling defaults (`LoadedModel.sampling_defaults`), checked once when it loads: a bad
    value in its files is named there, not in every request's error."""
    defaults = dict(getattr(model, "sampling_defaults", None) or {})
    try:
        SamplingParams(**defaults)
    except ValueError as exc:
        raise ModelLoadError(f"{model.source}: its sampling defaults (generation config): {exc}") from None
    return defaults
