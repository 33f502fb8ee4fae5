"""A nursery's lone failure, raised as itself.

trio wraps whatever fails in a nursery in an exception group. When exactly one thing failed (a bad parameter, a model
that will not load, a worker that did not start), callers and the CLI should see that error, which they can act on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def single_errors() -> Iterator[None]:
    """Re-raises a nursery's lone failure as itself; several failures stay a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise
