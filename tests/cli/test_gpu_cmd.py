"""`sagellm gpu` and the NVML inventory: on this machine (no NVIDIA driver) the real no-GPU answer; the table from
an inventory built here, since a GPU is the one boundary this machine lacks."""

from __future__ import annotations

import json

from rich.console import Console

from sagellm.gpu import GpuInfo, GpuInventory, gpu_inventory, render_gpu_table
from tests.cli.in_process import in_process
from tests.cli.test_cli import run


def test_no_gpu_is_an_empty_inventory_with_the_reason():
    inventory = gpu_inventory()
    assert inventory.gpus == [] and inventory.driver_version is None
    assert inventory.reason.startswith("no NVIDIA GPU found (NVML: ")


def test_cli_says_no_gpu_found(tmp_path, capsys, monkeypatch):
    table = run("gpu", home=tmp_path)  # the console script, once
    assert table.returncode == 0 and "no NVIDIA GPU found (NVML:" in table.stdout
    as_json = in_process(capsys, monkeypatch, tmp_path, "gpu", "--json")
    assert as_json.code == 0 and json.loads(as_json.out) == gpu_inventory().to_json()


def test_table_shows_each_gpu():
    inventory = GpuInventory(
        [
            GpuInfo(0, "NVIDIA A100-SXM4-40GB", 40960, 1024, 39936, 35, 41),
            GpuInfo(1, "NVIDIA A100-SXM4-40GB", 40960, 0, 40960, None, None),
        ],
        driver_version="550.54.15",
    )
    console = Console(width=200, record=True)
    console.print(render_gpu_table(inventory))
    text = console.export_text()
    assert text.count("NVIDIA A100-SXM4-40GB") == 2
    assert "1024 / 40960 MiB" in text and "39936 MiB" in text and "35%" in text and "41 °C" in text
    assert "driver 550.54.15" in text
    row = next(line for line in text.splitlines() if "0 / 40960 MiB" in line)
    assert row.count(" - ") >= 2  # utilization and temperature not reported: a dash, not a failure
