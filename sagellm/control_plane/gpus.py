"""The GPUs a control plane reports on: what NVML sees, and which of them the gateway gave each engine.

`get_metrics` and `get_instances` report GPU use per engine and overall; NVML is asked each time while it sees
GPUs, and never again once it found none, so a machine without GPUs pays for the question once."""

from __future__ import annotations

from typing import Any

from sagellm.control_plane.types import PerformanceMetrics


class GpuReader:
    """NVML's GPUs, asked once more each time while there are some."""

    def __init__(self) -> None:
        self._no_gpu = False  # NVML found none once: not asked again

    def gpus(self) -> list[Any]:
        """The GPUs NVML sees (asked once more each time while there are some)."""
        if self._no_gpu:
            return []
        from sagellm.runtime.comm.topology import gpu_inventory

        gpus = gpu_inventory().gpus
        self._no_gpu = not gpus
        return gpus

    def read_into(self, metrics: PerformanceMetrics) -> None:
        """GPU utilization and memory from NVML, averaged over the GPUs it sees; left None where there is none."""
        gpus = self.gpus()
        if not gpus:
            return
        utilizations = [g.utilization_percent for g in gpus if g.utilization_percent is not None]
        metrics.avg_gpu_utilization = sum(utilizations) / len(utilizations) if utilizations else None
        metrics.total_gpu_memory_gb = sum(g.memory_total_mib for g in gpus) / 1024
        metrics.used_gpu_memory_gb = sum(g.memory_used_mib for g in gpus) / 1024


def allotted_gpus(gateway: Any) -> dict[str, list[int]]:
    """The GPUs the gateway gave each engine it started (none for a server registered by address); called in the
    gateway's trio thread (`gateway.call`)."""
    return {engine_id: engine.gpus for engine_id, engine in gateway.gateway.engines.engines.items()}


def gpu_utilization(gpus: list[Any], allotted: list[int]) -> float | None:
    """The mean utilization (%) NVML reports for the GPUs an engine was given; None when it was given none, or NVML
    reports none of them."""
    values = [g.utilization_percent for g in gpus if g.index in allotted and g.utilization_percent is not None]
    return sum(values) / len(values) if values else None
