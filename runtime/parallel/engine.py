"""Starting an engine with whatever parallelism its config asks for: the one door the engine operators and `LLM`
use, so a size above 1 is never refused by one front end and honoured by another."""

from __future__ import annotations

import functools

from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.models.loaded import LoadedModel
from sagellm.runtime.parallel.tensor_parallel import TensorParallelRunner


def start_engine(config: EngineConfig, loaded: LoadedModel | None = None) -> LLMEngine:
    if config.tensor_parallel_size == 1:
        return LLMEngine(config, loaded)
    return LLMEngine(config, loaded, make_runner=functools.partial(TensorParallelRunner, engine=config))
