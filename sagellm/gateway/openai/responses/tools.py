"""A response request's `tools` as the chat's function tools: the functions the model may call, whichever way the
client grouped them.

The Responses API has more kinds of tool than functions. A `namespace` groups functions under a name (Codex sends
its sub-agent tools so: `{"type": "namespace", "name": ..., "description": ..., "tools": [{"type": "function",
...}]}`); the model here sees its functions by their own names, and a call of one comes back carrying the
namespace (`function_call.namespace`), as a client that keys its tools by namespace and name looks them up. Hosted
tools (`web_search`, `file_search`, `code_interpreter`, ...) run on OpenAI's side, and `custom` (freeform) tools need
a grammar per tool that this server does not build: a client like Codex sends them with every request whatever the
provider, so they are left out, each with a log line, instead of failing the request. Any other type is a 400, and so
are more functions than a chat may show (`request_limits.MAX_TOOLS`, namespaces' functions counted one by one)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import structlog

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.replies.tools import Function, FunctionName, Tool
from sagellm.runtime.engine.request_limits import MAX_TOOLS

log = structlog.get_logger("sagellm.responses")

# Tool types the Responses API defines that this server cannot run: left out of the prompt (see the module's words)
SKIPPED_TYPES = frozenset({
    "web_search", "web_search_preview", "web_search_preview_2025_03_11", "web_search_2025_08_26", "file_search",
    "code_interpreter", "image_generation", "computer", "computer_use_preview", "local_shell", "shell",
    "apply_patch", "mcp", "custom", "tool_search",
})  # fmt: skip


class FunctionTool(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTools(msgspec.Struct, kw_only=True):
    """The functions a request's tools hold, flat, and the namespace each nested one came from."""

    tools: list[Tool]
    namespaces: dict[str, str]  # function name -> its namespace, for the functions a namespace held


def function_tools(tools: list[dict[str, Any]] | None) -> FunctionTools:
    """The functions of `tools` (a namespace's in its place), the tools this server cannot run left out and logged;
    a 400 naming the tool for a malformed one or an unknown type."""
    found = FunctionTools(tools=[], namespaces={})
    for index, tool in enumerate(tools or []):
        _add(found, tool, f"tools[{index}]", namespace=None)
    return found


def _add(found: FunctionTools, tool: Any, where: str, namespace: str | None) -> None:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind == "function":
        if len(found.tools) == MAX_TOOLS:
            message = f"tools: at most {MAX_TOOLS} functions, namespaces' counted one by one; {where} is one more"
            raise ApiError(400, message, param="tools", code="invalid_request")
        function = _convert(tool, FunctionTool, where)
        found.tools.append(Tool(type="function", function=Function(
            name=function.name, description=function.description, parameters=function.parameters,
            strict=function.strict)))  # fmt: skip
        if namespace is not None:
            found.namespaces[function.name] = namespace
    elif kind == "namespace" and namespace is None:
        name, nested = tool.get("name"), tool.get("tools")
        if not isinstance(name, str) or not isinstance(nested, list):
            raise ApiError(400, f"{where}: a namespace needs a `name` and a list of `tools`", param=where)
        for index, inner in enumerate(nested):
            _add(found, inner, f"{where}.tools[{index}]", namespace=name)
    elif kind in SKIPPED_TYPES:
        name = tool.get("name")
        log.info("responses_tool_skipped", tool_type=kind, name=name, where=where, namespace=namespace,
                 why="a tool this server cannot run: the model is not shown it")  # fmt: skip
    else:
        kinds = "function or namespace" if namespace is None else "function"
        message = f"{where}.type: {kinds} (hosted tools are left out), got {kind!r}"
        raise ApiError(400, message, param=f"{where}.type")


def _convert(tool: dict[str, Any], into: type[FunctionTool], where: str) -> FunctionTool:
    try:
        return msgspec.convert(tool, into)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"{where}: {exc}", param=where, code="invalid_request") from None
