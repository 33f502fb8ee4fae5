"""The request reference of the gateway's APIs (OpenAI's, and Anthropic's Messages): every field of every body the
gateway decodes, with its type, its default and what the server does with it (each API's `field_help`), and vLLM's
and OpenAI's fields it refuses, with the values that ask for nothing and why. Read from the msgspec Structs that
validate the bodies, so a field the server accepts cannot be missing."""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Union, get_args, get_origin

import msgspec

from sagellm.cli.reference.markdown import NONE, anchor, cell, code, table
from sagellm.common.hints import describe
from sagellm.gateway.openai.generation.vllm_fields import UNSET
from sagellm.gateway.openapi import ANTHROPIC_BODIES, BODIES, field_help


def openai_reference() -> str:
    """The Markdown of every route's request fields."""
    index = table(
        ["route", "body"], [[f"[`{route}`](#{anchor(route)})", f"`{body.__name__}`"] for route, body in BODIES.items()]
    )
    return "\n\n".join([index, *(_route(route, body) for route, body in BODIES.items())]) + "\n"


def body_fields(body: type[msgspec.Struct]) -> list[msgspec.structs.FieldInfo]:
    """The body's fields: required ones first, then the body's own before those it shares with others."""
    order = [name for cls in body.__mro__ for name in vars(cls).get("__annotations__", {})]
    fields = sorted(msgspec.structs.fields(body), key=lambda f: order.index(f.name))
    return [f for f in fields if f.required] + [f for f in fields if not f.required]


def refused(field: msgspec.structs.FieldInfo) -> bool:
    """vLLM's and OpenAI's fields declared only so their presence is seen (`vllm_fields.py`)."""
    return field.default is UNSET


def _route(route: str, body: type[msgspec.Struct]) -> str:
    served = [f for f in body_fields(body) if not refused(f)]
    rows = [[code(f.name), cell(_type(f.type)), _default(f), cell(field_help(body, f.name))] for f in served]
    parts = [f"## `{route}`", table(["field", "type", "default", "what it does"], rows)]
    if body in ANTHROPIC_BODIES:
        parts.append("Other fields of Anthropic's API (`cache_control`, `context_management`, `service_tier`, "
                     "`container`, betas' fields) ask the engine for nothing it has: they are accepted without "
                     "effect.")  # fmt: skip
    unserved = [f for f in body_fields(body) if refused(f)]
    if unserved:
        rows = [[code(f.name), cell(field_help(body, f.name))] for f in unserved]
        parts += ["Fields of vLLM's and OpenAI's APIs this server does not serve: a request that sets one to anything "
                  "but a value that asks for nothing gets a 400 naming it.", table(["field", "why"], rows)]  # fmt: skip
    return "\n\n".join(parts)


def _type(hint: object) -> str:
    """The hint as a reader reads it: a constrained int (`Annotated[int, msgspec.Meta(...)]`) is an int; a capped
    list, map or string says its cap (`request_limits`)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        shown = _type(args[0])
        cap = next((m.max_length for m in args[1:] if isinstance(m, msgspec.Meta) and m.max_length is not None), None)
        unit = " characters" if args[0] is str else ""
        return shown if cap is None else f"{shown} (at most {cap:,}{unit})"
    if origin in (Union, UnionType):
        return " | ".join(_type(arg) for arg in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type(arg) for arg in args)}]"
    return describe(hint)


def _default(field: msgspec.structs.FieldInfo) -> str:
    if field.required:
        return "required"
    if field.default is msgspec.NODEFAULT:
        return NONE
    return code(field.default)
