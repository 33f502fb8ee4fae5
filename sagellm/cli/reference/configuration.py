"""The configuration reference page: the engine's settings (`EngineConfig`) with each spelling they have, then the
graph file's keys and every operator a graph may name (`graph_files`).

One setting has three spellings made from its one field: the `LLM(...)` keyword and the engine nodes' graph parameter
are its name, the CLI flag is what `add_engine_arguments` makes of it. The flags are read from a parser that function
built, not re-derived here, so the page shows what the commands accept."""

from __future__ import annotations

import argparse

from sagellm.cli.engine_flags import add_engine_arguments
from sagellm.cli.reference.commands import command_parsers
from sagellm.cli.reference.graph_files import engine_operators, graph_file_reference, operator_reference
from sagellm.cli.reference.markdown import NONE, anchor, cell, code, table
from sagellm.common.hints import describe
from sagellm.runtime.engine.config import ENGINE_FIELDS, SHORT_NAMES

ENGINE_HEADING = "Engine settings"


def configuration_reference() -> str:
    """The Markdown of the engine settings, the graph file's keys and the operators."""
    return "\n\n".join([engine_reference(), graph_file_reference(), operator_reference(anchor(ENGINE_HEADING))]) + "\n"


def engine_flags() -> dict[str, list[str]]:
    """Setting -> its command-line flags (none for `model`: each command names its model its own way)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_engine_arguments(parser)
    return {action.dest: action.option_strings for action in parser._actions if action.dest in ENGINE_FIELDS}


def engine_reference() -> str:
    flags = engine_flags()
    shorts = {name: short for short, name in SHORT_NAMES.items()}
    commands = [c for c, p in command_parsers().items() if "_engine_flags" in p._defaults]
    nodes = ", ".join(f"[`{name}`](#{anchor(name)})" for name in engine_operators())
    intro = (
        "Every engine takes these settings, however it is started. A setting's name is the keyword of `LLM(...)` "
        f"and the parameter of the engine nodes of a graph file ({nodes}); the flag is that of the commands that "
        f"start an engine ({', '.join(f'[`{c}`](cli.md#{anchor(c)})' for c in commands)}). A value out of range is "
        "refused with a message naming the setting, at the graph file's line."
    )
    rows = []
    for name, (hint, default, text) in ENGINE_FIELDS.items():
        setting = code(name) + (f" (also {code(shorts[name])} in a graph)" if name in shorts else "")
        flag = ", ".join(code(option) for option in flags.get(name, [])) or NONE
        rows.append([setting, cell(describe(hint)), code(default), flag, cell(text)])
    return "\n\n".join([f"## {ENGINE_HEADING}", intro, table(["setting", "type", "default", "CLI flag", "help"], rows)])
