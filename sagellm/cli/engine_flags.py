"""The engine's settings as command-line flags, made from `EngineConfig`'s fields so every command that starts or
configures an engine (`generate`, `engine start`, ...) offers the same flags with the same meaning and checks:
`--max-num-seqs 8`, `--kv-cache-memory-gb 2`, `--no-enable-prefix-caching`."""

from __future__ import annotations

import argparse
import json
import types
from typing import Any, Union, get_args, get_origin

from sagellm.runtime.engine.config import ENGINE_FIELDS, SHORT_NAMES

# vLLM's short flags (`-tp 2`, `--tp 2`), so its command lines run unchanged
ALIASES = {name: (f"-{short}", f"--{short}") for short, name in SHORT_NAMES.items()}


def add_engine_arguments(parser: argparse.ArgumentParser, *, defaults: dict[str, Any] | None = None) -> None:
    """One flag per setting but `model` (each command names its model its own way), and but a flag the command has
    already (`generate --seed` is a request's seed). A flag not given leaves the setting to its default:
    `EngineConfig`'s, or this command's in `defaults`."""
    defaults = defaults or {}
    group = parser.add_argument_group("engine settings")
    added = []
    for name, (hint, default, text) in ENGINE_FIELDS.items():
        flag, kind = "--" + name.replace("_", "-"), _scalar(hint)
        if name == "model" or flag in parser._option_string_actions:
            continue
        default = defaults.get(name, default)
        shown = text if default is None else f"{text} (default: {default})"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=shown)
        elif get_origin(kind) is list:
            group.add_argument(flag, type=_numbers, default=None, metavar="N,N,...", help=shown)
        elif get_origin(kind) is dict:
            group.add_argument(flag, type=_json_object, default=None, metavar="JSON", help=shown)
        else:
            flags = (flag, *ALIASES.get(name, ()))
            group.add_argument(*flags, type=kind, default=None, metavar=name.split("_")[-1].upper(), help=shown)
        added.append(name)
    parser.set_defaults(_engine_defaults=defaults, _engine_flags=added)


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line chose (the command's own defaults included), by `EngineConfig` field name."""
    chosen = dict(getattr(args, "_engine_defaults", {}))
    flags = getattr(args, "_engine_flags", ())
    chosen.update({name: getattr(args, name) for name in flags if getattr(args, name, None) is not None})
    return chosen


def _numbers(text: str) -> list[int]:
    """`0,1` -> [0, 1] (a list setting such as --device-ids)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _json_object(text: str) -> dict[str, Any]:
    """`{"method": "ngram", ...}` -> a dict (a setting given as a JSON object, vLLM's --speculative-config)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def _scalar(hint: Any) -> type:
    """`int | None` -> int: the type a flag's text converts to."""
    if get_origin(hint) in (Union, types.UnionType):
        return next(arg for arg in get_args(hint) if arg is not type(None))
    return hint
