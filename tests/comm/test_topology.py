"""This machine's topology: the CPU part from this machine's real sysfs (and from none, degraded), the GPU part from a
test double of NVML (this machine has no GPU; its real answer is checked too)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sagellm.runtime.comm.topology import cpu_topology, gpu_inventory, machine_topology
from tests.fake_nvml import FakeGpu, FakeNvml, nvswitch_node


def test_cpu_from_this_machines_sysfs():
    cpu = cpu_topology()
    assert cpu.threads == os.cpu_count()
    assert 1 <= cpu.sockets <= cpu.cores <= cpu.threads
    assert sorted(c for node in cpu.numa_nodes for c in node.cpus) == list(range(cpu.threads))
    meminfo = Path("/proc/meminfo").read_text().split()
    assert cpu.memory_total_mib == int(meminfo[meminfo.index("MemTotal:") + 1]) // 1024
    assert 0 < cpu.memory_available_mib <= cpu.memory_total_mib
    for node in cpu.numa_nodes:
        assert node.distances[node.id] == 10  # a node's distance to itself
        assert node.memory_total_mib is None or 0 < node.memory_total_mib <= cpu.memory_total_mib


def test_cpu_without_sysfs_is_one_socket_and_one_node(tmp_path):
    cpu = cpu_topology(sysfs=tmp_path / "sys", procfs=tmp_path / "proc")
    assert (cpu.sockets, cpu.cores, cpu.threads) == (1, os.cpu_count(), os.cpu_count())
    assert cpu.model is None and cpu.memory_available_mib is None
    assert cpu.memory_total_mib > 0  # from sysconf
    [node] = cpu.numa_nodes
    assert node.cpus == list(range(os.cpu_count())) and node.memory_total_mib == cpu.memory_total_mib


def test_this_machine_has_no_gpu_and_says_why():
    topology = machine_topology()
    assert topology.gpu.gpus == [] and topology.gpu.links == [] and topology.gpu.driver_version is None
    assert topology.gpu.reason.startswith("no NVIDIA GPU found (NVML: ")
    as_json = json.loads(json.dumps(topology.to_json()))
    assert as_json == topology.to_json()  # plain JSON: what the CLI and the management API send
    assert set(as_json) == {"gpus", "links", "driver_version", "reason", "cpu"}
    assert as_json["cpu"]["threads"] == os.cpu_count()


def test_nvswitch_node_is_one_nvlink_group():
    nvml = nvswitch_node(8)
    inventory = gpu_inventory(nvml)
    assert [g.index for g in inventory.gpus] == list(range(8)) and inventory.driver_version == "550.54.15"
    assert inventory.gpus[0].name == "NVIDIA A100-SXM4-80GB" and inventory.gpus[0].memory_total_mib == 81920
    assert {g.nvlinks for g in inventory.gpus} == {12}
    assert [g.numa_node for g in inventory.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len(inventory.links) == 28 and all(link.nvlink for link in inventory.links)
    assert inventory.nvlink_groups() == [list(range(8))]
    assert not nvml.open  # NVML shut down after reading


def test_nvlink_bridges_and_pcie_paths():
    """Four PCIe cards, NVLink-bridged in pairs: the pairs are the groups; the PCIe path of every pair is named."""
    gpus = [FakeGpu("NVIDIA RTX A6000", 49140, 1024, 35, 41, nvlinks=4, numa_node=i // 2) for i in range(4)]
    pcie = {(0, 1): FakeNvml.NVML_TOPOLOGY_SINGLE, (2, 3): FakeNvml.NVML_TOPOLOGY_HOSTBRIDGE}
    inventory = gpu_inventory(FakeNvml(gpus, nvlinked=[(0, 1), (2, 3)], pcie=pcie))
    assert inventory.nvlink_groups() == [[0, 1], [2, 3]]
    paths = {(link.a, link.b): (link.nvlink, link.pcie) for link in inventory.links}
    assert paths[0, 1] == (True, "PIX") and paths[2, 3] == (True, "PHB") and paths[0, 2] == (False, "SYS")
    gpu = inventory.gpus[0]
    assert gpu.memory_used_mib == 1024 and gpu.memory_free_mib == 48116
    assert (gpu.utilization_percent, gpu.temperature_c) == (35, 41)


def test_values_a_board_does_not_report_are_none():
    inventory = gpu_inventory(FakeNvml([FakeGpu(utilization_percent=None, temperature_c=None, numa_node=None)]))
    [gpu] = inventory.gpus
    assert (gpu.utilization_percent, gpu.temperature_c, gpu.numa_node, gpu.nvlinks) == (None, None, None, 0)
    assert inventory.links == [] and inventory.nvlink_groups() == [[0]]


def test_no_driver_and_no_device_are_reasons_not_errors():
    missing = gpu_inventory(FakeNvml([], init_error="NVML Shared Library Not Found"))
    assert missing.gpus == [] and missing.reason == "no NVIDIA GPU found (NVML: NVML Shared Library Not Found)"
    none = gpu_inventory(FakeNvml([]))
    assert none.reason == "no NVIDIA GPU found (NVML: the driver reports 0 devices)"
