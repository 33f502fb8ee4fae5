"""The name a misspelled one was probably meant to be: for the "did you mean" of a flag (`--max-tokns`), a shipped
graph (`pdd`) or a request field (`temprature`), so the error names the fix instead of only the mistake."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def likely_meant(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to `word` when one is close enough to be a typo of it (difflib's 0.6 similarity), else
    None: a word far from all of them gets no guess rather than a wrong one."""
    matches = difflib.get_close_matches(word, list(choices), n=1)
    return matches[0] if matches else None
