"""sageLLM: LLM serving as a dataflow pipeline of streaming operators, on its own inference runtime.

The public face re-exports from private modules; heavy imports (torch, transformers) happen on first use."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# OpenMP threads that spin while waiting turn every torch op into a scheduler time slice as soon as anything else
# (the gateway, a tokenizer, a load generator) shares the cores: measured 25-100x slower steps on 2 cores. Passive
# waiting costs a little on an idle machine and saves the shared one; it must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "UnifiedInferenceClient"]

if TYPE_CHECKING:
    from sagellm.client import UnifiedInferenceClient
    from sagellm.llm import LLM
    from sagellm.outputs import CompletionOutput, RequestOutput
    from sagellm.sampling_params import SamplingParams

_LAZY = {
    "LLM": "sagellm.llm",
    "SamplingParams": "sagellm.sampling_params",
    "RequestOutput": "sagellm.outputs",
    "CompletionOutput": "sagellm.outputs",
    "UnifiedInferenceClient": "sagellm.client",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sagellm' has no attribute {name!r}")
