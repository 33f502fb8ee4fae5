"""Presets: a set of engines to start on a running gateway, as a YAML file (`sagellm preset apply`).

    version: 1
    name: smollm2-cpu
    description: One SmolLM2 llm engine on the CPU.
    engines:
      - {name: smollm2, kind: llm, model: smollm2-135m-instruct, tensor_parallel: 1, label: cpu,
         max_concurrent: 16, use_gpu: false, engine: {max_num_seqs: 16}}

An engine is the body of `POST /v1/management/engines` (`EngineSpec`: kind, model, `engine` settings, `url`,
`api_key`, `served_model_name`, ...) with a `name`, which is its label when it has none; `kind: vllm` (`sglang`,
`llamacpp`) has the gateway start that project's own server, its program named by `command` or found on PATH
(`command`, and `args` beyond those that tune the server, only where the operator serves the preset: `sagellm serve
--model NAME=PRESET`; `sagellm preset apply` sends it over the API, which refuses them). The
built-in presets are the YAML files in this folder, for the models `sagellm model download` can fetch here. A file is
checked whole before anything starts, and every error names the file and the field
(`my.yaml: engines[1].engine.max_num_seqs: ...`)."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import msgspec
import yaml

from sagellm.common.errors import FieldError, InvalidInput
from sagellm.gateway.control.engine_spec import EngineSpec

VERSION = 1


class PresetError(InvalidInput):
    """A preset that cannot be found or is not valid; the message starts with the file (and field)."""


class PresetEngine(EngineSpec, kw_only=True, forbid_unknown_fields=True):
    name: str

    def spec(self) -> EngineSpec:
        """The engine as the management API takes it."""
        fields = msgspec.structs.asdict(self)
        name = fields.pop("name")
        fields["label"] = fields["label"] or name
        return EngineSpec(**fields)


class Preset(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: int
    name: str
    description: str = ""
    engines: list[PresetEngine]


def builtin_presets() -> dict[str, Path]:
    """Name -> file of every preset shipped with sagellm."""
    found = {}
    for entry in files(__name__).iterdir():
        if entry.name.endswith(".yaml"):
            found[entry.name.removesuffix(".yaml")] = Path(str(entry))
    return dict(sorted(found.items()))


def find_preset(name: str) -> Path:
    builtin = builtin_presets()
    if name not in builtin:
        raise PresetError(f"no built-in preset {name!r} (built-in: {', '.join(builtin)}); give a file with --file")
    return builtin[name]


def load_preset(path: str | Path) -> Preset:
    """The preset in `path`, checked: types, required and unknown fields, then each engine's values."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PresetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise PresetError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise PresetError(f"{path}: expected a mapping with version, name, description and engines")
    try:
        preset = msgspec.convert(data, Preset)
    except msgspec.ValidationError as exc:
        raise PresetError(f"{path}: {_located(str(exc))}") from None
    _check(path, preset)
    return preset


def _check(path: Path, preset: Preset) -> None:
    if preset.version != VERSION:
        raise PresetError(f"{path}: version: expected {VERSION}, got {preset.version}")
    if not preset.engines:
        raise PresetError(f"{path}: engines: a preset needs at least one engine")
    seen: dict[str, int] = {}
    for i, engine in enumerate(preset.engines):
        if engine.name in seen:
            raise PresetError(f"{path}: engines[{i}].name: {engine.name!r} is also engines[{seen[engine.name]}]")
        seen[engine.name] = i
        try:
            engine.spec().check()
        except FieldError as error:
            raise PresetError(f"{path}: engines[{i}].{error.field}: {error}") from None


def _located(message: str) -> str:
    """msgspec's `Expected int, got str - at $.engines[0].port` as `engines[0].port: Expected int, got str`."""
    found = re.fullmatch(r"(.*) - at `\$\.?(.*)`", message)
    if found is None:
        return message
    what, where = found.groups()
    return f"{where}: {what}" if where else what


def plan_rows(preset: Preset) -> list[dict[str, Any]]:
    """One row per engine for the plan tables of `preset show` and `preset apply`."""
    return [
        {
            "name": e.name,
            "kind": e.kind,
            "model": e.model,
            "served as": e.served_model_name or e.model,
            "tp": e.tensor_parallel,
            "max concurrent": e.max_concurrent or "-",
            "gpu": "yes" if e.use_gpu else "no",
        }
        for e in preset.engines
    ]
