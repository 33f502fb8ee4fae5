"""The benchmarks' own error: a run whose numbers would mean nothing stops, saying why."""

from __future__ import annotations

from sagellm.common.errors import SageLLMError


class BenchmarkError(SageLLMError, RuntimeError):  # RuntimeError: what callers catch it as
    """A run that cannot give numbers worth reporting: an engine did not do the work asked for, a path lost requests
    or tokens or delivered wrong bytes, a measurement had nothing to measure (the message says which)."""
