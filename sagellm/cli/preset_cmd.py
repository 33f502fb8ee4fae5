"""`sagellm preset list|show|apply`: start a set of engines, described in YAML, on the running gateway.

    sagellm preset list
    sagellm preset show --name smollm2-embed
    sagellm preset apply --name smollm2-cpu --dry-run       # the plan, nothing started
    sagellm preset apply --file my-preset.yaml -y          # no confirmation question

A preset file holds `version, name, description, engines: [{name, kind, model, tensor_parallel, label,
max_concurrent, use_gpu}]` (see sagellm/presets/*.yaml); it is checked whole before anything starts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagellm.cli.gateway_client import (
    ManagementClient,
    add_connection_arguments,
    engines_table,
    failures,
)
from sagellm.common.errors import InvalidInput, SageLLMError

if TYPE_CHECKING:
    from sagellm.presets import Preset, PresetEngine


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preset", help="list, show and apply engine presets (YAML)",
                       description=__doc__.split("\n\n")[0])  # fmt: skip
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the built-in presets")
    listing.set_defaults(run=run_list)
    show = actions.add_parser("show", help="a preset's engines (checked)")
    _add_source(show)
    show.set_defaults(run=run_show)
    apply = actions.add_parser("apply", help="start a preset's engines on the running gateway")
    _add_source(apply)
    apply.add_argument("--dry-run", action="store_true", help="print the plan and start nothing")
    apply.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    apply.add_argument("--no-wait", action="store_true", help="return once started instead of waiting until ready")
    apply.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for ready (default 900)")
    add_connection_arguments(apply)
    apply.set_defaults(run=run_apply)


def _add_source(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--name", help="a built-in preset (see `sagellm preset list`)")
    source.add_argument("--file", type=Path, help="a preset YAML file")


def _load(args: argparse.Namespace) -> Preset:
    from sagellm.presets import find_preset, load_preset

    return load_preset(args.file if args.file else find_preset(args.name))


def _plan(preset: Preset, title: str) -> Any:
    from rich.table import Table

    from sagellm.presets import plan_rows

    rows = plan_rows(preset)
    table = Table(title=title, caption=preset.description)
    for key in rows[0]:
        table.add_column(key, overflow="fold")  # a model path wraps instead of being cut
    for row in rows:
        table.add_row(*map(str, row.values()))
    return table


def run_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sagellm.presets import builtin_presets, load_preset

    table = Table("name", "engines", "description", title="built-in presets")
    for name, path in builtin_presets().items():
        preset = load_preset(path)
        table.add_row(name, ", ".join(f"{e.name} ({e.kind})" for e in preset.engines), preset.description)
    Console().print(table)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sagellm.presets import find_preset, load_preset

    path = args.file or find_preset(args.name)
    preset = load_preset(path)
    Console().print(_plan(preset, f"preset {preset.name} (version {preset.version}, {path})"))
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.prompt import Confirm

    preset = _load(args)
    console = Console()
    console.print(_plan(preset, f"plan: start {len(preset.engines)} engine(s) of preset {preset.name}"))
    if args.dry_run:
        console.print("dry run: nothing started")
        return 0
    client = ManagementClient.from_args(args)
    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidInput("not asking for confirmation without a terminal; add -y to apply")
        if not Confirm.ask(f"start these engines on {client.url}?"):
            return 1
    started, problems = [], []
    for engine in preset.engines:
        try:
            started.append(client.start_engine(_body(engine)))
        except SageLLMError as error:  # this one is refused (or the gateway is gone); the others still start
            problems.append(f"{engine.name}: {error}")
    if started and not args.no_wait:
        with console.status(f"waiting for {', '.join(e['id'] for e in started)}"):
            latest = client.wait_ready([e["id"] for e in started], args.timeout)
        started = [latest.get(e["id"], e) for e in started]
        problems += failures(started)
    if started:
        console.print(engines_table(started, title=f"preset {preset.name}"))
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def _body(engine: PresetEngine) -> dict[str, Any]:
    """The engine as the body of POST /v1/management/engines."""
    import msgspec

    return msgspec.structs.asdict(engine.spec())
