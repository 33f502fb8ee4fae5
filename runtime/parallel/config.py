"""`ParallelismConfig`: how one model is split over devices, as the four degrees every serving system names.

tp (tensor parallel) splits each layer's heads and MLP over devices that talk every layer, so they must share a fast
link; pp (pipeline parallel) gives each stage a run of whole layers and talks once per micro-batch, so it may cross
nodes; dp (data parallel) runs that many replicas side by side. ep (expert parallel) spreads a mixture-of-experts
layer's experts, whole, over `ep` of the tp x dp ranks of a stage instead of slicing every expert tp ways; it adds
no ranks."""

from __future__ import annotations

from dataclasses import dataclass

from sagellm.common.errors import InvalidInput


@dataclass(frozen=True)
class ParallelismConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
        if (self.tp * self.dp) % self.ep:
            raise InvalidInput(f"ep={self.ep} must divide the tp x dp = {self.tp * self.dp} ranks of a stage")

    @property
    def world_size(self) -> int:
        """The devices the split uses: tp x pp x dp (expert parallelism reuses those ranks)."""
        return self.tp * self.pp * self.dp

    @property
    def replica_size(self) -> int:
        """The devices one replica spans: tp x pp."""
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} ep={self.ep}"
