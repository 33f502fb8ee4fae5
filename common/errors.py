"""Errors every floor raises the same way."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class FieldError(ValueError):
    """A value its field does not allow. `field` names the field, so whoever read the value can point at where it was
    written: a graph file's line (`pd.yaml:9: nodes.engine.params.max_num_seqs: ...`), a preset's engine, a request
    body's `param`. The message is a whole sentence that also names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_known(keys: Iterable[object], known: Sequence[str], what: str, at: str = "") -> None:
    """Raises FieldError for the first of a settings mapping's `keys` that is not `known` (a typo), naming the known
    ones: `{at}{key}: unknown {what}; the settings are ...`."""
    for key in keys:
        if key not in known:
            field = f"{at}{key}"
            raise FieldError(field, f"{field}: unknown {what}; the settings are {', '.join(known)}")
