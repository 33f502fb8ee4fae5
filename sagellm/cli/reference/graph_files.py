"""The graph file's part of the configuration reference: its top-level keys, node keys and nested settings, and every
operator a node may name with its parameters.

The keys are those the YAML reader accepts (`TOP_KEYS`, `NODE_KEYS`) with the types the validator checks
(`GRAPH_ATTRS`); nested settings are the fields of the structs that read them; operators and their parameters come
from the registry and each operator's `__init__` and `parameter_help`. What the code holds no words for, what each
key means, is `KEY_HELP` below, which the tests hold to the reader's keys one for one."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from importlib.metadata import entry_points
from typing import Any, get_type_hints

from sagellm.cli.reference.markdown import NONE, cell, code, table
from sagellm.common.autoscale import AutoscaleSettings
from sagellm.common.hints import describe
from sagellm.common.restart import RestartPolicy
from sagellm.runtime.engine.config import ENGINE_FIELDS
from sagellm.runtime.pipeline.cluster import RayGroup
from sagellm.runtime.pipeline.operator import Operator, list_operators
from sagellm.runtime.pipeline.spec import GRAPH_ATTRS, PLACEMENTS
from sagellm.runtime.pipeline.yaml_io import EDGE_SYNTAX, NODE_KEYS, TOP_KEYS

KEY_HELP = {  # top-level key -> what it sets
    "name": "the graph's name (default: the file's name without `.yaml`)",
    "description": "what the graph does, in a line",
    "model": "the model of every engine node that names none: a path, a `.gguf` file, a cache alias or org/name",
    "mmproj": "a `.gguf` model's vision encoder, llama.cpp's multimodal projector file (`--mmproj`): the graph's "
    "engine and encode nodes see images through it",
    "language_model_only": "a multimodal model's text model alone (vLLM's `--language-model-only`): the graph's engine "
    "nodes load no encoder and refuse images and audio with a 400",
    "transport": "how the run's processes are linked: `ipc` on this host (default) or `tcp`, which `remote` and "
    "`ray` placements need",
    "restart": "how worker processes that die are started again (its keys: below)",
    "autoscale": "the replicas of the graph's engine a gateway serving the graph adds and removes (its keys: below)",
    "cluster": "the Ray cluster of the `ray:GROUP` placements: `ray:` its address (default `auto`: the one `ray "
    "start` made here) and `groups:` each process group's needs (their keys: below)",
    "shared_memory": "tensors between processes on one host go through shared memory, not ZeroMQ frames (default true)",
    "bind_host": "with tcp: the interface this host listens on",
    "advertise_host": "with tcp: the address other hosts reach this one at",
    "control_port": "with tcp: the fixed port of the control socket that workers started on other hosts connect to",
    "secure": "with tcp: encrypt and authenticate the links (default: when listening beyond loopback)",
    "nodes": "node id -> the node (its keys: below); ids are letters, digits, `_` and `-`, and keep their order",
    "edges": f"the links between nodes, as chains: {EDGE_SYNTAX}",
}
NODE_KEY_HELP = {  # node key -> what it sets
    "op": "the operator's registry name (required; the operators: below)",
    "params": "the operator's parameters, by name (default: none, every parameter at its default)",
    "placement": f"where the node runs: {PLACEMENTS} (default `task`: in the process that runs the graph)",
}
NESTED = {  # top-level key -> the struct whose fields are its keys
    "restart": RestartPolicy,
    "autoscale": AutoscaleSettings,
    "cluster: groups: NAME": RayGroup,
}
OPERATOR_ENTRY_POINTS = "sagellm.operators"  # the group the operator registry discovers (pyproject.toml)
TOP_TYPES = {"nodes": "mapping", "edges": "list[str]"}  # the two keys that are the graph, not a setting


def graph_file_reference() -> str:
    top = [[code(key), cell(TOP_TYPES.get(key) or describe(GRAPH_ATTRS[key])), cell(KEY_HELP[key])] for key in TOP_KEYS]
    node = [[code(key), cell(NODE_KEY_HELP[key])] for key in NODE_KEYS]
    parts = ["## Graph files", "A graph file (`sagellm run graph.yaml`, `sagellm serve graph.yaml`) is a YAML mapping "
             "with these keys; an unknown key is an error at its line.", table(["key", "type", "meaning"], top),
             "### Node keys", table(["key", "meaning"], node)]  # fmt: skip
    for key, struct in NESTED.items():
        parts += [f"### `{key}` keys", table(["key", "type", "default"], _fields(struct))]
    return "\n\n".join(parts)


def graph_operators() -> dict[str, type[Operator]]:
    """The operators any graph may name: those of the packages the registry's entry points load. A benchmark's
    fixture, registered by importing the benchmark, is left out: a graph names it only inside that benchmark."""
    packages = tuple(entry.value.partition(":")[0] for entry in entry_points(group=OPERATOR_ENTRY_POINTS))
    return {
        name: cls
        for name, cls in list_operators().items()
        if any(cls.__module__ == p or cls.__module__.startswith(p + ".") for p in packages)
    }


def engine_operators() -> list[str]:
    """The operators whose parameters are the engine settings (plus their own)."""
    return [name for name, cls in graph_operators().items() if set(ENGINE_FIELDS) <= set(cls.parameters())]


def operator_reference(engine_anchor: str) -> str:
    """Every registered operator: what it is, then its parameters (an engine node's settings by reference)."""
    parts = ["## Operators", "The operators a node's `op:` names, and the `params:` each takes."]
    engines = set(engine_operators())
    for name, cls in graph_operators().items():
        parts.append(f"### `{name}`")
        outputs = ", with several outputs" if cls.multi_output else ""
        parts.append(f"{_summary(cls)} A {cls.kind} operator{outputs}.")
        own = parameter_rows(cls, skip=set(ENGINE_FIELDS) if name in engines else set())
        if name in engines:
            parts.append(f"Its parameters are the [engine settings](#{engine_anchor}) and these:")
        if own:
            parts.append(table(["parameter", "type", "default", "help"], own))
        elif name not in engines:
            parts.append("It takes no parameters.")
    return "\n\n".join(parts)


def parameter_rows(cls: type[Operator], skip: set[str]) -> list[list[str]]:
    signature = inspect.signature(cls.__init__).parameters
    helps: dict[str, str] = getattr(cls, "parameter_help", {})
    rows = []
    for pname, (hint, required) in cls.parameters().items():
        if pname in skip:
            continue
        given = signature.get(pname)
        default = "required" if required else code(given.default) if given is not None else NONE
        rows.append([code(pname), cell(describe(hint)), default, cell(helps.get(pname))])
    return rows


def _summary(cls: type[Operator]) -> str:
    """The first paragraph of the operator class's own docstring, else of its module's, on one line."""
    doc = cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or ""
    text = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    return text if text.endswith(".") or not text else text + "."


def _fields(struct: type) -> list[list[str]]:
    hints = get_type_hints(struct)
    return [[code(f.name), cell(describe(hints[f.name])), _field_default(f)] for f in dataclasses.fields(struct)]


def _field_default(f: dataclasses.Field[Any]) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return code(f.default_factory())
    return NONE if f.default is dataclasses.MISSING else code(f.default)
