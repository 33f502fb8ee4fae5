"""`sagellm gpu`: the NVIDIA GPUs of this machine (NVML), or why there are none.

sagellm gpu            # a table: name, memory used / total / free, utilization, temperature, driver
sagellm gpu --json     # the same for scripts: {"gpus": [...], "driver_version", "reason"}"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu", help="show the NVIDIA GPUs (NVML)", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sagellm.gpu import gpu_inventory, render_gpu_table

    inventory = gpu_inventory()
    if args.json:
        print(json.dumps(inventory.to_json(), indent=2))
    else:
        Console().print(render_gpu_table(inventory))
    return 0
