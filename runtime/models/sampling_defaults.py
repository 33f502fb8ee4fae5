"""A model's own sampling defaults, read from its files: what its makers recommend, so a request that sets no
temperature samples the way the model was meant to (vLLM's `generation_config="auto"`).

A Hugging Face directory says it in generation_config.json, a GGUF file in llama.cpp's `general.sampling.*` keys (or
a generation_config.json beside it, which wins).
Only fields our sampler has are read, under SamplingParams' names; the engine floor checks their values
(`sampling_params.model_sampling_defaults`). A request's own values always win over these, and a model that says
nothing leaves SamplingParams' defaults."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sagellm.runtime.models.loaded import read_json

GENERATION_CONFIG = "generation_config.json"

_HF_FIELDS = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "max_new_tokens": int,
    "repetition_penalty": float,
}  # fmt: skip
_HF_NAMES = {"max_new_tokens": "max_tokens"}
_GGUF_FIELDS = {
    "general.sampling.temp": ("temperature", float),
    "general.sampling.top_p": ("top_p", float),
    "general.sampling.top_k": ("top_k", int),
    "general.sampling.min_p": ("min_p", float),
}


def from_generation_config(generation: Mapping[str, Any] | None) -> dict[str, Any]:
    """The sampling fields of a generation_config.json (`max_new_tokens` as `max_tokens`)."""
    given = {k: kind for k, kind in _HF_FIELDS.items() if (generation or {}).get(k) is not None}
    return {_HF_NAMES.get(k, k): _as(kind, generation[k]) for k, kind in given.items()} if generation else {}


def beside(gguf: Path) -> dict[str, Any]:
    """The sampling fields of a generation_config.json next to a GGUF file (the model cache writes one for a built-in
    model whose file says nothing), if there is one."""
    path = gguf.parent / GENERATION_CONFIG
    return from_generation_config(read_json(path)) if path.is_file() else {}


def from_gguf_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields of a GGUF file's metadata."""
    return {name: _as(kind, metadata[key]) for key, (name, kind) in _GGUF_FIELDS.items() if key in metadata}


def _as(kind: type, value: Any) -> Any:
    """JSON and GGUF numbers (numpy's too) as Python ones; anything else is kept as it is, for the engine's check to
    name."""
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is int and is_number and float(value).is_integer():
        return int(value)
    return float(value) if kind is float and is_number else value
