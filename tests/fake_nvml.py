"""A test double of the `pynvml` module: the functions and constants `runtime/comm/topology.gpu_inventory` calls,
answering for a described machine, since a GPU is the one boundary this machine lacks. Pass it as
`gpu_inventory(FakeNvml(...))`; nothing is patched.

Like NVML: a value a board does not report raises (NOT_SUPPORTED), names may come back as bytes (older bindings),
memory is in bytes, and a board without NVLink refuses the NVLink state query."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

MIB = 1024 * 1024


class FakeNvmlError(Exception):
    """Stands in for pynvml.NVMLError."""


@dataclass(frozen=True)
class FakeGpu:
    name: str = "NVIDIA A100-SXM4-80GB"
    memory_total_mib: int = 81920
    memory_used_mib: int = 0
    utilization_percent: int | None = 0
    temperature_c: int | None = 30
    nvlinks: int = 0  # active NVLink links
    numa_node: int | None = 0


class FakeNvml:
    NVMLError = FakeNvmlError
    NVML_TEMPERATURE_GPU = 0
    NVML_NVLINK_MAX_LINKS = 18
    NVML_FEATURE_ENABLED = 1
    NVML_P2P_CAPS_INDEX_NVLINK = 3
    NVML_P2P_STATUS_OK = 0
    NVML_P2P_STATUS_NOT_SUPPORTED = 5
    NVML_TOPOLOGY_INTERNAL = 0
    NVML_TOPOLOGY_SINGLE = 10
    NVML_TOPOLOGY_MULTIPLE = 20
    NVML_TOPOLOGY_HOSTBRIDGE = 30
    NVML_TOPOLOGY_NODE = 40
    NVML_TOPOLOGY_SYSTEM = 50

    def __init__(
        self,
        gpus: list[FakeGpu],
        nvlinked: list[tuple[int, int]] = (),
        pcie: dict[tuple[int, int], int] | None = None,
        init_error: str | None = None,
    ) -> None:
        self.gpus = gpus
        self.nvlinked = {frozenset(pair) for pair in nvlinked}
        self.pcie = pcie or {}  # (a, b) with a < b -> NVML_TOPOLOGY_*; SYSTEM when absent
        self.init_error = init_error
        self.open = False

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNvmlError(self.init_error)
        self.open = True

    def nvmlShutdown(self) -> None:
        self.open = False

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.gpus[handle].name.encode()

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        gpu = self.gpus[handle]
        total, used = gpu.memory_total_mib * MIB, gpu.memory_used_mib * MIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._reported(self.gpus[handle].utilization_percent))

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._reported(self.gpus[handle].temperature_c)

    def nvmlDeviceGetNumaNodeId(self, handle: int) -> int:
        return self._reported(self.gpus[handle].numa_node)

    def nvmlDeviceGetNvLinkState(self, handle: int, link: int) -> int:
        if link >= self.gpus[handle].nvlinks:
            raise FakeNvmlError("Not Supported")
        return self.NVML_FEATURE_ENABLED

    def nvmlDeviceGetP2PStatus(self, a: int, b: int, index: int) -> int:
        assert index == self.NVML_P2P_CAPS_INDEX_NVLINK
        linked = frozenset((a, b)) in self.nvlinked
        return self.NVML_P2P_STATUS_OK if linked else self.NVML_P2P_STATUS_NOT_SUPPORTED

    def nvmlDeviceGetTopologyCommonAncestor(self, a: int, b: int) -> int:
        return self.pcie.get((min(a, b), max(a, b)), self.NVML_TOPOLOGY_SYSTEM)

    def _reported(self, value: int | None) -> int:
        if not self.open:
            raise FakeNvmlError("Uninitialized")
        if value is None:
            raise FakeNvmlError("Not Supported")
        return value


def nvswitch_node(count: int = 8, memory_mib: int = 81920) -> FakeNvml:
    """A DGX-like node: every pair of GPUs joined through NVSwitches, 12 links each."""
    gpus = [FakeGpu(memory_total_mib=memory_mib, nvlinks=12, numa_node=i * 2 // count) for i in range(count)]
    pairs = [(a, b) for a in range(count) for b in range(a + 1, count)]
    return FakeNvml(gpus, nvlinked=pairs)
