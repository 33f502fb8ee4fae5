"""`sagellm backends`: every registered hardware backend, whether it runs here, and why not."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backends", help="list hardware backends and their availability", description=__doc__)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sagellm.backends import list_backends

    table = Table("backend", "available", "details")
    for name, status in list_backends():
        table.add_row(name, "[green]yes[/]" if status.available else "[red]no[/]", status.reason)
    Console().print(table)
    return 0
