"""The few pieces of Markdown the reference pages are made of: tables whose cells survive any help text, values as
code, and headings' anchors as MkDocs spells them.

Help texts are written for a terminal, so they may hold `|` (a cell separator in a table), `<stdin>` (an HTML tag
to Markdown) or a line break; a cell escapes them outside code spans and leaves code spans as written (Python-Markdown,
which MkDocs uses, splits no cell inside one)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import PurePath
from typing import Any

NONE = "—"  # an empty cell: no default, no value


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table; cells are Markdown already (see `cell` and `code`)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cell(text: str | None) -> str:
    """Plain text (with `code spans`) as one table cell."""
    if not text:
        return NONE
    parts = " ".join(text.split()).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans at all
        parts = ["`".join(parts)]
    for i in range(0, len(parts), 2):  # outside code spans (a `|` inside one does not split a cell in MkDocs)
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return "`".join(parts)


def code(value: Any) -> str:
    """A value as a reader types it, in a code span: `true`, `16`, `auto`, `[0, 1]` (None: no value)."""
    if value is None:
        return NONE
    text = _typed(value)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _typed(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (str, PurePath)):
        return str(value) or "''"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_typed(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_typed(k)}: {_typed(v)}" for k, v in value.items()) + "}"
    return str(value)


def anchor(heading: str) -> str:
    """The id MkDocs' default `toc` slugify gives a heading (code spans count as their text): "`sagellm serve`" ->
    "sagellm-serve". Headings here are words, hyphens and spaces, where that slugify is this."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)
