"""What makes a prompt's token ids something a model can run: the one check that the engine (offline requests)
and admission (every request entering a pipeline, before it is queued) both make."""

from __future__ import annotations

from collections.abc import Sequence


def prompt_token_problem(token_ids: Sequence[object], vocab_size: int | None) -> str | None:
    """What is wrong with `token_ids` (None: nothing): empty, not integers, or outside the model's vocabulary."""
    if not token_ids:
        return "prompt is empty: it has no tokens"
    if not all(type(t) is int for t in token_ids):  # not bool, not float: JSON gives 1.5 and true as easily as 1
        return "prompt_token_ids must be integers"
    if vocab_size is not None and (min(token_ids) < 0 or max(token_ids) >= vocab_size):  # type: ignore[type-var]
        return f"prompt_token_ids must be in [0, {vocab_size}) (the model's vocabulary)"
    return None
