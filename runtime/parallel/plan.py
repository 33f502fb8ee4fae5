"""What the planner returns: every split it sized (`Alternative`: memory on the fullest device, whether it fits),
the one it recommends with why (`Recommendation`), or `PlanError` when none fits."""

from __future__ import annotations

from dataclasses import dataclass

from sagellm.common.errors import InvalidInput
from sagellm.runtime.parallel.config import ParallelismConfig
from sagellm.runtime.parallel.devices import gib


class PlanError(InvalidInput):
    """No split of the model fits the devices; the message says how much memory it needs, and `alternatives`
    holds every split sized."""

    def __init__(self, message: str, alternatives: list[Alternative]) -> None:
        super().__init__(message)
        self.alternatives = alternatives


@dataclass(frozen=True)
class Alternative:
    config: ParallelismConfig
    weights_gib: float  # on the fullest device
    kv_gib: float  # the KV budget on the fullest device
    usable_gib: float  # each device's memory the engine may fill
    roomy: bool  # the weights leave the KV cache at least as much memory again
    uneven: bool  # KV heads split unequally over the tensor-parallel ranks

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.kv_gib

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.usable_gib

    @property
    def note(self) -> str:
        """Why it ranks where it does, in a few words."""
        if not self.fits:
            return f"needs {gib(self.total_gib)} GiB > {gib(self.usable_gib)} usable"
        notes = [] if self.roomy else [f"weights fill {self.weights_gib / self.usable_gib:.0%} of usable memory"]
        return "; ".join([*notes, "uneven head split"] if self.uneven else notes)


@dataclass(frozen=True)
class Recommendation:
    choice: Alternative
    alternatives: list[Alternative]  # every split sized, best first: the choice, then the runners-up
    explanation: str

    @property
    def config(self) -> ParallelismConfig:
        return self.choice.config
