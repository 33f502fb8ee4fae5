"""sageLLM: LLM serving as a dataflow pipeline of streaming operators, on its own inference runtime.

The public face re-exports names from the floors below; heavy imports (torch, transformers) happen on first use, and
importing it changes nothing in the process (no environment, no logging set-up: the CLI and workers do that).

The floors, bottom to top (docs/architecture.md): `sagellm.common`, `sagellm.backends`, `sagellm.runtime`,
`sagellm.operators`, this package's library (gateway, client, `LLM`, DSL, SAGE adapter), `sagellm.benchmarks`, and
the CLI. A floor imports only the floors below it."""

from __future__ import annotations

from importlib.metadata import version
from typing import TYPE_CHECKING

__version__ = version("sagellm")  # pyproject.toml's, the one place the version is written
__all__ = [
    "LLM",
    "SamplingParams",
    "GuidedDecoding",
    "LoRARequest",
    "RequestOutput",
    "CompletionOutput",
    "UnifiedInferenceClient",
    "SageLLMError",
]

if TYPE_CHECKING:
    from sagellm.client import UnifiedInferenceClient
    from sagellm.common.errors import SageLLMError
    from sagellm.llm import LLM
    from sagellm.runtime.engine.guided_params import GuidedDecoding
    from sagellm.runtime.engine.lora_request import LoRARequest
    from sagellm.runtime.engine.outputs import CompletionOutput, RequestOutput
    from sagellm.runtime.engine.sampling_params import SamplingParams

_LAZY = {
    "LLM": "sagellm.llm",
    "SamplingParams": "sagellm.runtime.engine.sampling_params",
    "GuidedDecoding": "sagellm.runtime.engine.guided_params",  # vLLM's GuidedDecodingParams: the same fields
    "LoRARequest": "sagellm.runtime.engine.lora_request",  # vLLM's: LoRARequest(name, id, path)
    "RequestOutput": "sagellm.runtime.engine.outputs",
    "CompletionOutput": "sagellm.runtime.engine.outputs",
    "UnifiedInferenceClient": "sagellm.client",
    "SageLLMError": "sagellm.common.errors",  # every error sageLLM names; its kinds are in that module
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sagellm' has no attribute {name!r}")
