"""Errors every floor raises the same way."""

from __future__ import annotations


class FieldError(ValueError):
    """A value its field does not allow. `field` names the field, so whoever read the value can point at where it was
    written: a graph file's line (`pd.yaml:9: nodes.engine.params.max_num_seqs: ...`), a preset's engine, a request
    body's `param`. The message is a whole sentence that also names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
