"""The planner's devices: described by hand, or read from a topology (GPUs from a test double of NVML, the CPU from
this machine)."""

from __future__ import annotations

import pytest

from sagellm.runtime.comm.topology import Topology, cpu_topology, gpu_inventory
from sagellm.runtime.parallel.devices import Devices
from tests.fake_nvml import FakeGpu, FakeNvml, nvswitch_node


def _topology(nvml: FakeNvml) -> Topology:
    return Topology(cpu_topology(), gpu_inventory(nvml))


def test_an_nvswitch_node_is_one_group():
    devices = Devices.from_topology(_topology(nvswitch_node(8)))
    assert (devices.kind, devices.count, devices.memory_gib, devices.group_size) == ("gpu", 8, 80, 8)
    assert devices.name == "NVIDIA A100-SXM4-80GB" and devices.usable_gib == 72
    assert devices.describe() == "8 GPUs of 80 GiB (72 usable), 1 fast-link group of 8"


def test_nvlink_pairs_are_groups_of_two_and_the_smallest_memory_counts():
    gpus = [FakeGpu(memory_total_mib=49140, nvlinks=4) for _ in range(3)] + [FakeGpu(memory_total_mib=46068, nvlinks=4)]
    devices = Devices.from_topology(_topology(FakeNvml(gpus, nvlinked=[(0, 1), (2, 3)])))
    assert devices.group_size == 2 and devices.groups == 2 and devices.memory_gib == 46068 / 1024


def test_gpus_without_nvlink_share_the_node():
    devices = Devices.from_topology(_topology(FakeNvml([FakeGpu(), FakeGpu()])))
    assert devices.count == devices.group_size == 2


def test_without_gpus_the_cpu_is_one_device_with_the_machines_memory():
    cpu = cpu_topology()
    devices = Devices.from_topology(Topology(cpu, gpu_inventory(FakeNvml([]))))
    assert (devices.kind, devices.count, devices.group_size) == ("cpu", 1, 1)
    assert devices.memory_gib == cpu.memory_total_mib / 1024 and devices.describe().startswith("1 CPU of ")


def test_described_by_hand():
    assert Devices.gpus(4, 24).group_size == 4  # fewer than a node: one group of them all
    assert Devices.gpus(32, 80, per_node=8).groups == 4
    with pytest.raises(ValueError, match="12 devices do not split into fast-link groups of 8"):
        Devices.gpus(12, 80)
    with pytest.raises(ValueError, match="memory per device must be > 0 GiB"):
        Devices.gpus(1, 0)
