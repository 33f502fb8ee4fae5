"""`sagellm gpu`: this machine's devices: CPU sockets, cores and NUMA nodes, and the NVIDIA GPUs (NVML) with the links
between them, or why there are none.

sagellm gpu            # tables: CPU and NUMA nodes; GPUs (memory used / total / free, utilization, temperature,
                       # NVLinks, NUMA node, driver); how each pair of GPUs is linked
sagellm gpu --json     # the same for scripts: {"gpus": [...], "links", "driver_version", "reason", "cpu": {...}}"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sagellm.runtime.comm.topology import CpuTopology, GpuInventory, Topology


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gpu", help="show this machine's CPUs, NUMA nodes and NVIDIA GPUs", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sagellm.runtime.comm.topology import machine_topology

    topology = machine_topology()
    if args.json:
        print(json.dumps(topology.to_json(), indent=2))
    else:
        console = Console()
        for renderable in render_topology(topology):
            console.print(renderable)
    return 0


def render_topology(topology: Topology) -> list[Any]:
    """rich renderables: the CPU and its NUMA nodes, then the GPUs and their links (or the reason there are none)."""
    return [*_cpu_tables(topology.cpu), *_gpu_tables(topology.gpu)]


def _cpu_tables(cpu: CpuTopology) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    available = "" if cpu.memory_available_mib is None else f" ({cpu.memory_available_mib} MiB available)"
    summary = Text(
        f"{cpu.model or 'CPU'}: {cpu.sockets} socket{'s' if cpu.sockets > 1 else ''}, {cpu.cores} cores, "
        f"{cpu.threads} threads; memory {cpu.memory_total_mib} MiB{available}"
    )
    table = Table("NUMA node", "CPUs", "memory", "distances")
    for node in cpu.numa_nodes:
        memory = "-" if node.memory_total_mib is None else f"{node.memory_total_mib} MiB"
        table.add_row(str(node.id), _ranges(node.cpus), memory, " ".join(map(str, node.distances)) or "-")
    return [summary, table]


def _gpu_tables(inventory: GpuInventory) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    if not inventory.gpus:
        return [Text(inventory.reason or "no NVIDIA GPU found", style="yellow")]
    table = Table("gpu", "name", "memory used / total", "free", "util", "temp", "NVLinks", "NUMA", title="NVIDIA GPUs")
    for gpu in inventory.gpus:
        table.add_row(
            str(gpu.index),
            gpu.name,
            f"{gpu.memory_used_mib} / {gpu.memory_total_mib} MiB",
            f"{gpu.memory_free_mib} MiB",
            "-" if gpu.utilization_percent is None else f"{gpu.utilization_percent}%",
            "-" if gpu.temperature_c is None else f"{gpu.temperature_c} °C",
            str(gpu.nvlinks),
            "-" if gpu.numa_node is None else str(gpu.numa_node),
        )
    table.caption = f"driver {inventory.driver_version}"
    if not inventory.links:
        return [table]
    # The pairs as `nvidia-smi topo -m` shows them: NV (NVLink), else the PCIe path.
    kind = {(link.a, link.b): "NV" if link.nvlink else link.pcie or "?" for link in inventory.links}
    indexes = [gpu.index for gpu in inventory.gpus]
    links = Table("", *(f"gpu{i}" for i in indexes), title="GPU links")
    for a in indexes:
        links.add_row(f"gpu{a}", *("X" if a == b else kind[min(a, b), max(a, b)] for b in indexes))
    groups = " ".join("[" + ",".join(map(str, g)) + "]" for g in inventory.nvlink_groups())
    legend = Text(
        "NV: NVLink; else the PCIe path: PIX one switch, PXB several, PHB a host bridge, NODE one NUMA node, "
        f"SYS across NUMA nodes. NVLink groups: {groups}"
    )
    return [table, links, legend]


def _ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> "0-3,8", as the kernel writes CPU lists."""
    runs: list[list[int]] = []
    for cpu in cpus:
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
