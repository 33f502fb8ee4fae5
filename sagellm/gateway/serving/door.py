"""The gateway's door: a client's request, of one prompt or several, admitted or refused whole on arrival, before
any prompt enters the graph (`Admission.admit_group`: the graph's admission nodes' own checks, which then let the
admitted requests through). Under overload most arrivals are refused here, and a refusal here costs none of the
graph's hops."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from sagellm.gateway.serving.errors import api_error
from sagellm.operators.admission import Admission
from sagellm.runtime.pipeline.messages import Request


def admit_at_door(
    requests: list[Request], operators: Iterable[Any], waiting: int, sinks: Callable[[], Iterable[Any]]
) -> None:
    """Asks each admission node among `operators` whether `requests` may enter, `waiting` requests submitted ahead of
    them not entered yet. A refusal is counted in the metrics of `sinks()` (the graph's metrics sinks in this process),
    once for each prompt, as the admission node would have, and raised: ApiError 429 (or 400)."""
    passed: list[Admission] = []
    for admission in (op for op in operators if isinstance(op, Admission)):
        refusal = admission.admit_group(requests, waiting=waiting)
        if refusal is not None:
            for earlier in passed:
                earlier.give_back(requests)
            for sink in sinks():
                for request in requests:
                    sink.execute(msgspec.structs.replace(refusal, request_id=request.request_id))
            raise api_error(refusal)
        passed.append(admission)
