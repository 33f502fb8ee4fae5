"""Priority classes by name (the control-plane API's RequestPriority, a body's `priority` or `X-Request-Priority`);
lower runs first. Here, below everything that names them, so the gateway reads them without importing the engine.

The `low` class and every one after it yields to the others in the engine (`yielding.py`): the Batch API sends its
requests `low`, so a batch job beside live traffic does not take the live requests' latency."""

PRIORITY_CLASSES = {"critical": -1, "high": 0, "normal": 1, "low": 2}
YIELDING_PRIORITY = PRIORITY_CLASSES["low"]


def yields(priority: int, yielding_from: int | None) -> bool:
    """Whether a sequence of `priority` yields in a step where the classes from `yielding_from` on yield (None: a
    step where none does, no higher class being in the engine)."""
    return yielding_from is not None and priority >= yielding_from
