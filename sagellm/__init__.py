"""sageLLM: LLM serving as a dataflow pipeline of streaming operators, on its own inference runtime.

The public face re-exports from private modules; heavy imports (torch, transformers) happen on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

if TYPE_CHECKING:
    from sagellm.llm import LLM
    from sagellm.outputs import CompletionOutput, RequestOutput
    from sagellm.sampling_params import SamplingParams

_LAZY = {
    "LLM": "sagellm.llm",
    "SamplingParams": "sagellm.sampling_params",
    "RequestOutput": "sagellm.outputs",
    "CompletionOutput": "sagellm.outputs",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sagellm' has no attribute {name!r}")
