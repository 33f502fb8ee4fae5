"""This machine's devices: CPU sockets, cores and NUMA nodes (sysfs, what `lscpu` reads), its memory, and the NVIDIA
GPUs with the links between them (NVML: `pynvml`, from the `nvidia-ml-py` distribution).

One reading of the machine for everything that asks: the parallelism planner (`sagellm.runtime.parallel`) keeps
tensor parallelism inside GPUs that share NVLink, the gateway gives free GPUs to the engines it starts, and
`sagellm gpu` and `GET /v1/management/gpu` show it. A machine that lacks something is a normal answer, not an error:
a file sysfs does not have leaves its default (one socket, one NUMA node holding every CPU), and a machine without an
NVIDIA driver or GPU has an empty GPU list and the reason ("no NVIDIA GPU found (NVML: ...)"), so every caller can
say why in one line. A value one GPU does not report (temperature on some boards, utilization under MIG) is None."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
MIB = 1024 * 1024
SYSFS = Path("/sys/devices/system")
PROCFS = Path("/proc")


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: list[int]
    memory_total_mib: int | None  # None when sysfs does not say
    distances: list[int]  # to every node, by node id (10: itself); empty when unknown


@dataclass(frozen=True)
class CpuTopology:
    model: str | None  # "AMD EPYC 7763 64-Core Processor"
    sockets: int
    cores: int  # physical cores
    threads: int  # logical CPUs online
    numa_nodes: list[NumaNode]
    memory_total_mib: int
    memory_available_mib: int | None


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_mib: int
    memory_used_mib: int
    memory_free_mib: int
    utilization_percent: int | None  # GPU busy time over the last sample period
    temperature_c: int | None
    nvlinks: int = 0  # active NVLink links (to peers or to an NVSwitch)
    numa_node: int | None = None  # the NUMA node nearest the GPU


@dataclass(frozen=True)
class GpuLink:
    """How two GPUs reach each other: over NVLink (directly or through an NVSwitch), else over PCIe, named as
    `nvidia-smi topo -m` names it: BOARD (one board), PIX (one PCIe switch), PXB (several PCIe switches), PHB (a
    host bridge), NODE (host bridges of one NUMA node), SYS (across NUMA nodes)."""

    a: int
    b: int
    nvlink: bool
    pcie: str | None  # None when NVML does not say


@dataclass(frozen=True)
class GpuInventory:
    gpus: list[GpuInfo] = field(default_factory=list)
    links: list[GpuLink] = field(default_factory=list)  # one per pair of GPUs
    driver_version: str | None = None
    reason: str | None = None  # why `gpus` is empty

    def nvlink_groups(self) -> list[list[int]]:
        """The GPUs joined by NVLink, directly or through each other (a GPU on its own is a group of one)."""
        group = {gpu.index: {gpu.index} for gpu in self.gpus}
        for link in self.links:
            if link.nvlink and group[link.a] is not group[link.b]:
                merged = group[link.a] | group[link.b]
                for index in merged:
                    group[index] = merged
        unique = {id(members): sorted(members) for members in group.values()}
        return sorted(unique.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Topology:
    cpu: CpuTopology
    gpu: GpuInventory

    def to_json(self) -> dict[str, Any]:
        """The GPU inventory's keys (gpus, links, driver_version, reason) with the CPU's beside them."""
        return {**self.gpu.to_json(), "cpu": asdict(self.cpu)}


def machine_topology() -> Topology:
    """This machine's CPUs, memory and GPUs (blocking: NVML takes a moment; call it from a worker thread in async
    code)."""
    return Topology(cpu_topology(), gpu_inventory())


# -- CPUs and memory (sysfs, procfs) ------------------------------------------------------------------------------
def cpu_topology(sysfs: Path = SYSFS, procfs: Path = PROCFS) -> CpuTopology:
    """Sockets are distinct `physical_package_id`s, cores distinct `core_cpus_list`s (the hyperthreads of one core);
    without sysfs every online CPU is a core of one socket and one NUMA node."""
    cpus = _cpu_list(_read(sysfs / "cpu/online")) or list(range(os.cpu_count() or 1))
    sockets, cores = set(), set()
    for cpu in cpus:
        topology = sysfs / f"cpu/cpu{cpu}/topology"
        sockets.add(_read(topology / "physical_package_id") or "0")
        cores.add(_read(topology / "core_cpus_list") or _read(topology / "thread_siblings_list") or str(cpu))
    memory = _meminfo(procfs / "meminfo")
    total_mib = memory.get("MemTotal", 0) // 1024 or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB
    available = memory.get("MemAvailable")
    return CpuTopology(
        model=_cpu_model(procfs / "cpuinfo"),
        sockets=len(sockets),
        cores=len(cores),
        threads=len(cpus),
        numa_nodes=_numa_nodes(sysfs / "node") or [NumaNode(0, cpus, total_mib, [10])],
        memory_total_mib=total_mib,
        memory_available_mib=None if available is None else available // 1024,
    )


def _numa_nodes(root: Path) -> list[NumaNode]:
    nodes = []
    for node in _cpu_list(_read(root / "online")):
        here = root / f"node{node}"
        total_kib = _meminfo(here / "meminfo").get("MemTotal")
        nodes.append(
            NumaNode(
                id=node,
                cpus=_cpu_list(_read(here / "cpulist")),
                memory_total_mib=None if total_kib is None else total_kib // 1024,
                distances=[int(d) for d in (_read(here / "distance") or "").split()],
            )
        )
    return nodes


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # absent on this kernel, or not readable in this container
        return None


def _cpu_list(text: str | None) -> list[int]:
    """A kernel CPU or node list, "0-3,8-11" -> [0, 1, 2, 3, 8, 9, 10, 11]."""
    cpus: list[int] = []
    for part in (text or "").split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def _meminfo(path: Path) -> dict[str, int]:
    """/proc/meminfo ("MemTotal:  24684084 kB") or a node's meminfo ("Node 0 MemTotal:  13199564 kB"), in KiB."""
    values = {}
    for line in (_read(path) or "").splitlines():
        words = line.split()
        key = next((i for i, word in enumerate(words) if word.endswith(":")), None)
        if key is not None and key + 1 < len(words) and words[key + 1].isdigit():
            values[words[key][:-1]] = int(words[key + 1])
    return values


def _cpu_model(cpuinfo: Path) -> str | None:
    for line in (_read(cpuinfo) or "").splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("model name", "Model name"):
            return value.strip()
    return None


# -- NVIDIA GPUs (NVML) -------------------------------------------------------------------------------------------
def gpu_inventory(nvml: Any = None) -> GpuInventory:
    """Every NVIDIA GPU NVML sees and how each pair is linked (blocking). `nvml` is the `pynvml` module unless given
    another with its interface."""
    if nvml is None:
        import pynvml as nvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        return GpuInventory(reason=f"no NVIDIA GPU found (NVML: {error})")
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            return GpuInventory(reason="no NVIDIA GPU found (NVML: the driver reports 0 devices)")
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        gpus = [_device(nvml, i, handle) for i, handle in enumerate(handles)]
        links = [_link(nvml, a, b, handles[a], handles[b]) for a, b in combinations(range(count), 2)]
        return GpuInventory(gpus, links, driver_version=_text(nvml.nvmlSystemGetDriverVersion()))
    except nvml.NVMLError as error:
        return GpuInventory(reason=f"NVML failed: {error}")
    finally:
        nvml.nvmlShutdown()


def _device(nvml: Any, index: int, handle: Any) -> GpuInfo:
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = _optional(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    temperature = _optional(nvml, lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
    return GpuInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total_mib=memory.total // MIB,
        memory_used_mib=memory.used // MIB,
        memory_free_mib=memory.free // MIB,
        utilization_percent=utilization,
        temperature_c=temperature,
        nvlinks=_active_nvlinks(nvml, handle),
        numa_node=_optional(nvml, lambda: nvml.nvmlDeviceGetNumaNodeId(handle)),
    )


def _active_nvlinks(nvml: Any, handle: Any) -> int:
    active = 0
    for link in range(nvml.NVML_NVLINK_MAX_LINKS):
        state = _optional(nvml, lambda link=link: nvml.nvmlDeviceGetNvLinkState(handle, link))
        if state is None:  # no NVLink on this board, or no link of this number
            break
        active += state == nvml.NVML_FEATURE_ENABLED
    return active


def _link(nvml: Any, a: int, b: int, handle_a: Any, handle_b: Any) -> GpuLink:
    """NVLink when peer-to-peer over NVLink works (true through an NVSwitch too); the PCIe path from the pair's
    nearest common ancestor."""
    p2p = _optional(nvml, lambda: nvml.nvmlDeviceGetP2PStatus(handle_a, handle_b, nvml.NVML_P2P_CAPS_INDEX_NVLINK))
    ancestor = _optional(nvml, lambda: nvml.nvmlDeviceGetTopologyCommonAncestor(handle_a, handle_b))
    paths = {
        nvml.NVML_TOPOLOGY_INTERNAL: "BOARD",
        nvml.NVML_TOPOLOGY_SINGLE: "PIX",
        nvml.NVML_TOPOLOGY_MULTIPLE: "PXB",
        nvml.NVML_TOPOLOGY_HOSTBRIDGE: "PHB",
        nvml.NVML_TOPOLOGY_NODE: "NODE",
        nvml.NVML_TOPOLOGY_SYSTEM: "SYS",
    }
    return GpuLink(a, b, nvlink=p2p == nvml.NVML_P2P_STATUS_OK, pcie=paths.get(ancestor))


def _optional(nvml: Any, read: Callable[[], T]) -> T | None:
    try:
        return read()
    except nvml.NVMLError:  # NOT_SUPPORTED on this board or mode, or a function this driver lacks
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
