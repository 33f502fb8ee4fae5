"""Whether a value fits a type hint, and a hint as a reader writes it: how settings written by hand (a graph file,
a preset, an HTTP body, `--set`) are checked against the Python signature or struct that takes them."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin


def conforms(value: Any, hint: Any) -> bool:
    """Whether a parameter value fits its type hint. bool is not an int; an int is a float (YAML writes 1 for 1.0)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin is list:
        return isinstance(value, list) and (not args or all(conforms(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (
            not args or all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
        )
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(origin, type):  # other generics (Callable[[], float], tuple[int, ...]): check the container only
        return isinstance(value, origin)
    return isinstance(hint, type) and isinstance(value, hint)


def describe(hint: Any) -> str:
    """A type hint as a reader writes it: `int | None`, `list[str]`, `one of 'fifo', 'priority'`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(describe(arg) for arg in args)
    if hint is type(None):
        return "None"
    if args and isinstance(origin, type):
        return f"{origin.__name__}[{', '.join(describe(arg) for arg in args)}]"
    return getattr(hint, "__name__", str(hint))
