"""`Devices`: the devices a model may be split over, as the planner needs them: how many, the memory of each, and
how many share a fast link (an NVLink domain, else a node's PCIe).

Described by hand (`Devices.gpus(32, 80, per_node=8)`: plan for a cluster this machine is not) or read from this
machine (`Devices.from_topology`): its NVIDIA GPUs, else its CPU as one device with the machine's RAM."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sagellm.common.errors import InvalidInput
from sagellm.runtime.comm.topology import Topology

MEMORY_UTILIZATION = 0.9  # the share of a device's memory the engine may fill (vLLM's gpu_memory_utilization)


@dataclass(frozen=True)
class Devices:
    kind: str  # "gpu" or "cpu"
    count: int
    memory_gib: float  # each device's (the smallest, when they differ)
    group_size: int  # devices per fast-link group: tensor parallelism stays inside one
    name: str = ""  # "NVIDIA A100-SXM4-80GB", "AMD EPYC"
    memory_utilization: float = MEMORY_UTILIZATION

    def __post_init__(self) -> None:
        if self.kind not in ("gpu", "cpu"):
            raise InvalidInput(f"kind must be 'gpu' or 'cpu', got {self.kind!r}")
        if self.count < 1 or self.group_size < 1 or self.count % self.group_size:
            raise InvalidInput(f"{self.count} devices do not split into fast-link groups of {self.group_size}")
        if not self.memory_gib > 0:
            raise InvalidInput(f"memory per device must be > 0 GiB, got {self.memory_gib}")
        if not 0 < self.memory_utilization <= 1:
            raise InvalidInput(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")

    @classmethod
    def gpus(cls, count: int, memory_gib: float, per_node: int = 8, name: str = "") -> Devices:
        """`count` GPUs of `memory_gib` each in nodes of `per_node` (fewer GPUs than that: one node of them all)."""
        return cls("gpu", count, memory_gib, min(count, per_node), name)

    @classmethod
    def from_topology(cls, topology: Topology, *, use_gpus: bool = True) -> Devices:
        """The NVIDIA GPUs in groups of the size every NVLink domain is a multiple of (all of them when none has
        NVLink: one node's PCIe); without GPUs (or `use_gpus`), the CPU with the machine's memory."""
        gpus = topology.gpu.gpus if use_gpus else []
        if not gpus:
            cpu = topology.cpu
            return cls("cpu", 1, cpu.memory_total_mib / 1024, 1, cpu.model or "CPU")
        groups = topology.gpu.nvlink_groups()
        nvlinked = any(len(group) > 1 for group in groups)
        group_size = math.gcd(*(len(group) for group in groups)) if nvlinked else len(gpus)
        memory_gib = min(gpu.memory_total_mib for gpu in gpus) / 1024
        return cls("gpu", len(gpus), memory_gib, group_size, gpus[0].name)

    @property
    def usable_gib(self) -> float:
        return self.memory_gib * self.memory_utilization

    @property
    def groups(self) -> int:
        return self.count // self.group_size

    def describe(self) -> str:
        """ "8 GPUs of 80 GiB (72.0 usable), 1 fast-link group of 8"."""
        unit = "GPU" if self.kind == "gpu" else "CPU"
        plural = "s" if self.count > 1 else ""
        groups = f", {self.groups} fast-link group{'s' if self.groups > 1 else ''} of {self.group_size}"
        return (
            f"{self.count} {unit}{plural} of {gib(self.memory_gib)} GiB ({gib(self.usable_gib)} usable)"
            f"{groups if self.count > 1 else ''}"
        )


def gib(value: float) -> str:
    """80.0 -> "80", 23.54 -> "23.5": sizes as people write them."""
    return f"{value:.1f}".removesuffix(".0")
