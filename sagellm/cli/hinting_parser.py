"""The `sagellm` command's argument parser: a misspelled flag or command is answered with the one it was probably
meant to be, under the usage of the command it was given to.

Plain argparse lets each subcommand's parser pass the flags it does not know up to the top-level one, which then
prints the top-level usage (`sagellm [-h] [--version] COMMAND ...`) and `unrecognized arguments: --max-tokns 5`,
leaving the user to find the right spelling in `--help`. Here the error comes from the parser of the (sub)command the
line chose, with its usage, and names the closest flag it has; a command or choice that is not one names the closest
that is."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from sagellm.common.typos import likely_meant


class HintingParser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands' parsers are HintingParsers too (argparse makes them of the parent's
    class)."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen = _chosen_parser(self, parsed)
            chosen.unrecognized(extras, also=self)
        return parsed

    def unrecognized(self, extras: list[str], also: argparse.ArgumentParser) -> NoReturn:
        """Exits (2) naming `extras`, and for each flag among them the closest of this parser's (and `also`'s)."""
        known = _option_strings(self) | _option_strings(also)
        hints = []
        for arg in extras:
            flag = arg.split("=", 1)[0]
            meant = likely_meant(flag, known) if flag.startswith("-") else None
            if meant:
                hints.append(f"{flag}: did you mean {meant}?")
        self.error("; ".join([f"unrecognized arguments: {' '.join(extras)}", *hints]))

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """argparse's check of a command or choice, with the closest valid one named when it is not one."""
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as error:
            meant = likely_meant(str(value), [str(choice) for choice in action.choices or ()])
            if meant is None:
                raise
            raise argparse.ArgumentError(action, f"{error.message}; did you mean {meant!r}?") from None


def _chosen_parser(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> HintingParser:
    """The parser of the deepest subcommand the command line chose (`sagellm gateway start` -> gateway start's)."""
    while True:
        subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(parsed, subcommands[0].dest, None) if subcommands else None
        if name is None or name not in subcommands[0].choices:
            return parser  # type: ignore[return-value]
        parser = subcommands[0].choices[name]


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}
