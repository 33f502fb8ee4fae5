"""The `relay` operator: hands every item on unchanged.

A graph whose last real node runs in another process ends with a relay in the process that runs the graph, so the
items come back to it (a leaf's items reach that process's ledger, and whoever reads it: a gateway's replica link)."""

from __future__ import annotations

from typing import Any

from sagellm.runtime.pipeline.operator import MapOperator, register_operator


@register_operator
class Relay(MapOperator):
    name = "relay"

    def execute(self, item: Any) -> Any:
        return item
