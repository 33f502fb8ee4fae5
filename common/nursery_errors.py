"""A nursery's failures as what they are.

trio wraps whatever fails in a nursery in an exception group. When exactly one thing failed (a bad parameter, a model
that will not load, a worker that did not start), callers and the CLI should see that error, which they can act on;
when several did, each of them (`leaves`), and whether the code named every one (`named_failures`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sagellm.common.errors import InternalError, SageLLMError


@contextmanager
def single_errors() -> Iterator[None]:
    """Re-raises a nursery's lone failure as itself; several failures stay a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise


def leaves(error: BaseException) -> list[BaseException]:
    """The failures an exception group holds, however nested; else `error` alone."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def named_failures(error: BaseException) -> list[SageLLMError]:
    """The failures in `error` when the code named every one (a SageLLMError, not an InternalError: that is a bug),
    which are told as one line each; else none."""
    found = leaves(error)
    if all(isinstance(leaf, SageLLMError) and not isinstance(leaf, InternalError) for leaf in found):
        return [leaf for leaf in found if isinstance(leaf, SageLLMError)]
    return []
