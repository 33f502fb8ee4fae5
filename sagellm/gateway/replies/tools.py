"""Tool calling as OpenAI's chat API and vLLM serve it: the request's `tools` and `tool_choice` checked, shown to the
model by its chat template, and its reply read back into `tool_calls` by the model's tool-call parser.

The tools go into the prompt through the model's own chat template when it shows them (Qwen2.5/3, Llama 3.x, Hermes
models, gpt-oss); a ChatML model whose template ignores them (SmolLM2's) gets the Hermes-style fallback template
(`tool_template.jinja`) instead, a gpt-oss model without a template Harmony's (`chat_templates`); any other model's
tool request is a 400. `tool_choice` `none` leaves the tools out of the prompt; `auto` lets the model choose and
parses what it wrote; `required` and a named function constrain the reply with guided decoding to the parser's
format around each function's parameters schema (a llguidance Lark grammar with `%json`; for gpt-oss, Harmony's call
messages), so the reply always parses and its arguments always follow the schema; an object there that declares its
properties takes no others unless it says so, as vLLM's default grammar reads it. A model another server serves (an
attached vLLM, llama.cpp or sageLLM) gets the tools and the choice as the client gave them: that server shows and
enforces them, and its calls come back through `remote_engine` as Hermes blocks, read by that parser."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.replies.tool_parsers import FALLBACK_TEMPLATE, FORWARDED_CALLS, ToolCall, default_parser
from sagellm.runtime.engine.guided_params import COMPACT_JSON, GuidedDecoding

FunctionName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]


class Function(msgspec.Struct, kw_only=True):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object (None: no arguments)
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    function: Function


class NamedFunction(msgspec.Struct, kw_only=True):
    name: FunctionName


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolUse(msgspec.Struct, kw_only=True):
    """A chat request's tools as the rest of the gateway sees them (`plan`)."""

    tools: list[dict[str, Any]] | None  # for the chat template (None: not shown to the model)
    chat_template: str | None  # the template to render with instead of the model's own (None: the model's)
    parser: str | None  # how to read tool calls out of the reply (None: the reply is plain text)
    constraint: GuidedDecoding | None  # required or named: the reply's grammar
    # For a model another server serves: `tool_choice` and `parallel_tool_calls` as the client gave them, for that
    # server to honour (its calls come back in the `hermes` format, `remote_engine`); None for a model served here.
    forwarded: tuple[str | dict[str, Any] | None, bool] | None = None


def plan(
    tools: list[Tool] | None,
    choice: ToolChoice | None,
    parallel: bool,
    model_template: str | None,
    parser_override: str | None = None,
) -> ToolUse | None:
    """What a chat's `tools` and `tool_choice` mean for this model (`model_template`: its chat template; None for a
    model served elsewhere); None when the chat has no tools. A 400 naming the field for a `tool_choice` that names
    a function not in `tools`, one without tools, or tools this model cannot be shown."""
    if not tools:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice: needs tools to choose from", param="tool_choice")
        return None
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise ApiError(400, f"tools: function names must be unique, got {names}", param="tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        message = f"tool_choice: function {choice.function.name!r} is not in tools ({', '.join(names)})"
        raise ApiError(400, message, param="tool_choice")
    if choice == "none":
        return ToolUse(tools=None, chat_template=None, parser=None, constraint=None)
    as_dicts = [msgspec.to_builtins(tool) for tool in tools]
    if model_template is None:  # another server's model: it shows the tools and enforces the choice
        forwarded = (msgspec.to_builtins(choice) if choice is not None else None, parallel)
        return ToolUse(tools=as_dicts, chat_template=None, parser=FORWARDED_CALLS, constraint=None, forwarded=forwarded)
    template = _template_for_tools(model_template)
    parser = parser_override or default_parser(template or model_template, None)
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    chosen = [t for t in tools if t.function.name == named] if named else tools
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    constraint = GuidedDecoding(grammar=call_grammar(chosen, parser, parallel)) if forced else None
    return ToolUse(tools=as_dicts, chat_template=template, parser=parser, constraint=constraint)


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    """A parsed call as OpenAI's `tool_calls` entry."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def takes_tools(model_template: str) -> bool:
    """Whether a model with this chat template is given tools: its template shows them, or it speaks ChatML (the
    fallback's format)."""
    return "tools" in model_template or "<|im_start|>" in model_template


def _template_for_tools(model_template: str) -> str | None:
    """None to render with the model's own template (it shows tools), else the fallback; a 400 when neither can."""
    if "tools" in model_template:
        return None
    if takes_tools(model_template):
        return FALLBACK_TEMPLATE
    message = "tools: this model's chat template has no tool support (and it is not ChatML, the fallback's format)"
    raise ApiError(400, message, param="tools")


def call_grammar(tools: list[Tool], parser: str, parallel: bool) -> str:
    """A Lark grammar (llguidance's, with `%json`) of replies that are tool calls of `tools` in `parser`'s format:
    one call, or with `parallel` one or more."""
    if parser == "openai":
        return _harmony_call_grammar(tools, parallel)
    call = {"anyOf": [_call_schema(tool, parser) for tool in tools], "x-guidance": COMPACT_JSON}
    body = f"%json {json.dumps(call)}"
    if parser == "llama3_json":
        more = ' ("; " call)*' if parallel else ""
        return f"start: call{more}\ncall: {body}\n"
    more = "+" if parallel else ""
    return f"start: call{more}\n" + 'call: "<tool_call>\\n" ' + body + ' "\\n</tool_call>"\n'


def _harmony_call_grammar(tools: list[Tool], parallel: bool) -> str:
    """gpt-oss's calls: each a Harmony message to `functions.NAME` whose content is the arguments' JSON, its
    markers the tokenizer's special tokens (llguidance's `<|...|>`); several are joined as Harmony joins messages.
    The grammar's end ends the reply, where the model would write `<|call|>`."""
    more = ' (<|end|> <|start|> "assistant" call)*' if parallel else ""
    rules = [f"start: call{more}", "call: " + " | ".join(f"call{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        arguments = {**_arguments_schema(tool), "x-guidance": COMPACT_JSON}
        header = json.dumps(f"commentary to=functions.{tool.function.name} ")
        rules.append(f'call{i}: <|channel|> {header} <|constrain|> "json" <|message|> %json {json.dumps(arguments)}')
    return "\n".join(rules) + "\n"


def _call_schema(tool: Tool, parser: str) -> dict[str, Any]:
    arguments = _arguments_schema(tool)
    key = "parameters" if parser == "llama3_json" else "arguments"
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, key: arguments},
        "required": ["name", key],
        "additionalProperties": False,
    }


def _arguments_schema(tool: Tool) -> dict[str, Any]:
    """The schema a forced call's arguments follow: the function's `parameters` (none: an empty object) with every
    object closed to keys it does not declare, unless it says otherwise, as vLLM's default grammar backend reads a
    schema (xgrammar's `strict_mode`). Left open, a small model adds keys of its own until `max_tokens` cuts the call
    short, and a call that does not parse comes back as text (smolagents' tools, whose schemas say nothing of
    further keys, then never run)."""
    return _closed(tool.function.parameters or {"type": "object", "properties": {}})


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> subschema
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")  # each item a subschema (not `allOf`: its parts add up to one)
_OPEN_KEYS = ("additionalProperties", "unevaluatedProperties", "patternProperties")  # a schema's own say on more keys


def _closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on each object schema that declares its `properties` and has no
    say of its own on further keys, down through its properties, items, alternatives and definitions. An object
    that declares none (`{"type": "object"}`, a free-form map) stays open: closed, it could only be `{}`."""
    if not isinstance(schema, dict):
        return schema
    out = {key: _closed_within(key, value) for key, value in schema.items()}
    if "properties" in schema and not any(key in schema for key in _OPEN_KEYS):
        out["additionalProperties"] = False
    return out


def _closed_within(key: str, value: Any) -> Any:
    """A schema keyword's value with the subschemas it holds closed (`_closed`)."""
    if key in _SCHEMA_MAPS and isinstance(value, dict):
        return {name: _closed(sub) for name, sub in value.items()}
    if key in _SCHEMA_LISTS and isinstance(value, list):
        return [_closed(sub) for sub in value]
    if key in ("items", "additionalProperties"):
        return [_closed(sub) for sub in value] if isinstance(value, list) else _closed(value)
    return value
