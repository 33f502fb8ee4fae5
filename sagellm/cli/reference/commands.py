"""The CLI reference page: every `sagellm` command at every depth with every option, read from the argparse parsers
the commands themselves build, so the page says what `--help` says and never falls behind the code.

A command is a heading (`## \\`sagellm serve\\``, anchor `sagellm-serve`), its description, a synopsis, and a table per
argument group: option, value, default, help. `-h/--help`, which every command has, is said once in the page's
introduction instead of in each table; an option whose help is `argparse.SUPPRESS` is hidden from `--help` on purpose
and stays out of the page too."""

from __future__ import annotations

import argparse
from functools import cache
from pathlib import Path

from sagellm.cli.main import build_parser
from sagellm.cli.reference.markdown import NONE, anchor, cell, code, table

ROOT = Path(__file__).resolve().parents[3]  # the checkout (or site-packages) that holds the sagellm package
TYPE_NAMES = {int: "int", float: "float", Path: "path"}  # a flag's type worth saying beside its metavar


@cache
def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Command ("sagellm bench serve") -> its parser, every command at every depth, parents first, in `--help` order.

    `build_parser` gives a bench kind its options only when its argv names that kind (importing every benchmark would
    slow every `--help`), so each command's parser is taken from a build whose argv names it, as when it runs. Built
    once a process (the imports of every benchmark take seconds); callers read the parsers, never change them."""
    parsers = dict(_walk(build_parser([])))
    for command in parsers:
        words = command.split()[1:]
        if words:
            parsers[command] = dict(_walk(build_parser(words)))[command]
    return parsers


def summaries() -> dict[str, str]:
    """Command -> the one-line help its parent lists it with (the top command: its description)."""
    root = build_parser([])
    found = {root.prog: root.description or ""}
    for _, parser in _walk(root):
        for sub in _subcommands(parser):
            for choice in sub._choices_actions:
                found[f"{parser.prog} {choice.dest}"] = choice.help or ""
    return found


def cli_reference() -> str:
    """The Markdown of every command, in the order `--help` lists them."""
    helps = summaries()
    return "\n\n".join(_command(command, parser, helps) for command, parser in command_parsers().items()) + "\n"


def documented_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments a command's tables list: all but `-h/--help`, subcommand choices and suppressed ones."""
    return [
        action
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        and action.help != argparse.SUPPRESS
    ]


def _walk(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(parser.prog, parser)]
    for sub in _subcommands(parser):
        for child in dict.fromkeys(sub.choices.values()):  # an alias names the same parser twice
            found += _walk(child)
    return found


def _subcommands(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]


def _command(command: str, parser: argparse.ArgumentParser, helps: dict[str, str]) -> str:
    depth = len(command.split())
    parts = [f"{'#' * max(2, depth)} `{command}`", _prose(parser.description or helps.get(command, ""))]
    parts.append(f"```text\n{_synopsis(parser)}\n```")
    for sub in _subcommands(parser):
        rows = [(f"[`{c}`](#{anchor(c)})", cell(helps.get(c))) for c in (f"{command} {n}" for n in sub.choices)]
        parts.append(table([_metavar(sub), "what it does"], rows))
    shown = set(documented_actions(parser))
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if action in shown]
        if actions:
            parts.append(f"**{group.title}**" if group.title else "")
            parts.append(table(["argument", "value", "default", "help"], [_row(parser, a) for a in actions]))
    if parser.epilog:
        parts.append(f"```text\n{parser.epilog.strip()}\n```")
    return "\n\n".join(part for part in parts if part)


def _prose(text: str) -> str:
    """A description written for a terminal as Markdown: its paragraphs kept, its indented examples as code."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _synopsis(parser: argparse.ArgumentParser) -> str:
    """`sagellm serve [OPTIONS] [MODEL_OR_GRAPH]`: the positionals as `--help`'s usage writes them, options folded."""
    formatter = parser._get_formatter()
    words = [parser.prog]
    if any(action.option_strings for action in documented_actions(parser)):
        words.append("[OPTIONS]")
    for action in parser._actions:
        if not action.option_strings and action.help != argparse.SUPPRESS:
            words.append(formatter._format_args(action, formatter._get_default_metavar_for_positional(action)))
    return " ".join(words)


def _metavar(action: argparse.Action) -> str:
    return str(action.metavar or action.dest).upper()


def _row(parser: argparse.ArgumentParser, action: argparse.Action) -> list[str]:
    formatter = parser._get_formatter()
    if action.option_strings:
        names = ", ".join(code(option) for option in action.option_strings)
        metavar = formatter._get_default_metavar_for_optional(action)
    else:
        names = code(action.metavar or action.dest)
        metavar = formatter._get_default_metavar_for_positional(action)
    usage = formatter._format_args(action, metavar)
    value = NONE if action.nargs == 0 or usage == metavar == names.strip("`") else code(usage)
    if action.nargs != 0 and action.type in TYPE_NAMES:
        value += f" ({TYPE_NAMES[action.type]})"
    return [names, value, _default(action), cell(formatter._expand_help(action) if action.help else None)]


def _default(action: argparse.Action) -> str:
    """The value a flag not given leaves; none for on/off switches (their default is being off) and empty lists. A
    file of the checkout (a shipped graph) is named from the checkout's root, so the page reads the same anywhere."""
    default = action.default
    if action.nargs == 0 or default in (None, argparse.SUPPRESS, []):
        return NONE
    if isinstance(default, (str, Path)) and Path(default).is_absolute() and Path(default).is_relative_to(ROOT):
        default = Path(default).relative_to(ROOT)
    return code(default)
