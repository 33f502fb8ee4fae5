"""`sagellm gpu`: on this machine (no NVIDIA driver) its CPU and NUMA nodes and the real no-GPU answer; the GPU tables
from an inventory read through a test double of NVML, since a GPU is the one boundary this machine lacks."""

from __future__ import annotations

import json
import os

from rich.console import Console

from sagellm.cli.gpu_cmd import render_topology
from sagellm.runtime.comm.topology import Topology, cpu_topology, gpu_inventory, machine_topology
from tests.cli.in_process import in_process
from tests.cli.test_cli import run
from tests.fake_nvml import FakeGpu, FakeNvml, nvswitch_node


def _text(topology: Topology) -> str:
    console = Console(width=200, record=True)
    for renderable in render_topology(topology):
        console.print(renderable)
    return console.export_text()


def test_cli_shows_the_cpu_and_says_no_gpu_found(tmp_path, capsys, monkeypatch):
    table = run("gpu", home=tmp_path)  # the console script, once
    assert table.returncode == 0 and "no NVIDIA GPU found (NVML:" in table.stdout
    assert f"{os.cpu_count()} threads" in table.stdout and "NUMA node" in table.stdout
    as_json = in_process(capsys, monkeypatch, tmp_path, "gpu", "--json")
    assert as_json.code == 0
    reply = json.loads(as_json.out)
    expected = machine_topology().to_json()
    assert reply["gpus"] == [] and reply["reason"] == expected["reason"] and reply["driver_version"] is None
    assert reply["cpu"]["numa_nodes"] == expected["cpu"]["numa_nodes"]


def test_table_shows_each_gpu():
    gpus = [
        FakeGpu("NVIDIA A100-SXM4-40GB", 40960, 1024, 35, 41, nvlinks=12, numa_node=0),
        FakeGpu("NVIDIA A100-SXM4-40GB", 40960, 0, None, None, nvlinks=12, numa_node=None),
    ]
    text = _text(Topology(cpu_topology(), gpu_inventory(FakeNvml(gpus, nvlinked=[(0, 1)]))))
    assert text.count("NVIDIA A100-SXM4-40GB") == 2
    assert "1024 / 40960 MiB" in text and "39936 MiB" in text and "35%" in text and "41 °C" in text
    assert "driver 550.54.15" in text
    row = next(line for line in text.splitlines() if "0 / 40960 MiB" in line)
    assert row.count(" - ") >= 3  # utilization, temperature, NUMA node not reported: a dash, not a failure
    assert "NVLink groups: [0,1]" in text


def test_links_show_nvlink_or_the_pcie_path():
    pcie = {(0, 1): FakeNvml.NVML_TOPOLOGY_SINGLE}
    text = _text(Topology(cpu_topology(), gpu_inventory(FakeNvml([FakeGpu(), FakeGpu(), FakeGpu()], pcie=pcie))))
    assert _matrix(text) == [["X", "PIX", "SYS"], ["PIX", "X", "SYS"], ["SYS", "SYS", "X"]]
    assert "NVLink groups: [0] [1] [2]" in text
    eight = _text(Topology(cpu_topology(), gpu_inventory(nvswitch_node(8))))
    assert _matrix(eight) == [["X" if a == b else "NV" for b in range(8)] for a in range(8)]
    assert "NVLink groups: [0,1,2,3,4,5,6,7]" in eight


def _matrix(text: str) -> list[list[str]]:
    """The link table's cells, row by row."""
    rows = [line.strip("│ ").split("│") for line in text.splitlines() if line.startswith("│ gpu")]
    return [[cell.strip() for cell in row[1:]] for row in rows]
