"""sageLLM: LLM serving as a dataflow pipeline of streaming operators, on its own inference runtime.

The public face re-exports from private modules; heavy imports (torch, transformers) happen on first use."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# How OpenMP's workers wait between parallel regions (libgomp reads it when torch loads it, so it is set here, before
# torch is imported). Spinning long (libgomp's default 300,000 spins, or forever under ACTIVE) turns every op into a
# scheduler time slice as soon as anything else shares the cores: steps 25-100x slower on 2 cores. Sleeping at once
# (PASSIVE) pays a futex wake-up for each of the ~120 regions of a step, slower still while a load generator or the
# gateway's own thread keeps waking on the other core. A short spin catches the next region of the same step: W1 at
# 16 concurrent through the gateway 129 -> 150 tok/s; a busy process on one of the two cores costs a decode step
# 150 ms instead of PASSIVE's 88. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "5000"

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
