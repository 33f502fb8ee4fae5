"""What makes a request's token ids something a model can run: the checks that the engine (offline requests) and
admission (every request entering a pipeline, before it is queued) both make. SamplingParams checks the rest of a
request once, where it is built; only these need the model's vocabulary, which admission and the engine know."""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.runtime.engine.sampling_params import SamplingParams


def request_token_problem(token_ids: Sequence[object], params: SamplingParams, vocab_size: int | None) -> str | None:
    """What is wrong with a request's prompt token ids or the ones its sampling names (None: nothing)."""
    return prompt_token_problem(token_ids, vocab_size) or sampling_token_problem(params, vocab_size)


def prompt_token_problem(token_ids: Sequence[object], vocab_size: int | None) -> str | None:
    """What is wrong with `token_ids` (None: nothing): empty, not integers, or outside the model's vocabulary."""
    if not token_ids:
        return "prompt is empty: it has no tokens"
    if not all(type(t) is int for t in token_ids):  # not bool, not float: JSON gives 1.5 and true as easily as 1
        return "prompt_token_ids must be integers"
    if vocab_size is not None and (min(token_ids) < 0 or max(token_ids) >= vocab_size):  # type: ignore[type-var]
        return f"prompt_token_ids must be in [0, {vocab_size}) (the model's vocabulary)"
    return None


def sampling_token_problem(params: SamplingParams, vocab_size: int | None) -> str | None:
    """What is wrong with the token ids `params` names (None: nothing): `logit_bias`'s, `allowed_token_ids` or the
    bad words' (tokenized before they came) outside the model's vocabulary, where a bias, an allowed or a banned
    token would index logits that do not exist."""
    if vocab_size is None:
        return None
    named = (
        ("logit_bias", params.logit_bias or ()),
        ("allowed_token_ids", params.allowed_token_ids or ()),
        ("bad_words", [t for ids in params.bad_words_token_ids or () for t in ids]),
    )
    for name, ids in named:
        beyond = next((t for t in ids if t >= vocab_size), None)
        if beyond is not None:
            return f"{name} must name token ids in [0, {vocab_size}) (the model's vocabulary), got {beyond}"
    return None
