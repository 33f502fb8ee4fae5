"""A model runner over a loaded model, with a KV cache of a given geometry: how the engine's runner, each other rank's
of a parallel group and a draft model's are made alike from what the loader read."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sagellm.runtime.engine.model_runner import ModelRunner

if TYPE_CHECKING:
    from sagellm.backends.base import HardwareBackend
    from sagellm.runtime.engine.cache_geometry import CacheGeometry
    from sagellm.runtime.models.loaded import LoadedModel


def runner_over(
    model: LoadedModel,
    backend: HardwareBackend,
    cache: CacheGeometry,
    *,
    quantized: bool = True,
    make: Callable[..., ModelRunner] = ModelRunner,
    **options: Any,
) -> ModelRunner:
    """`make`'s runner (it takes ModelRunner's arguments: a parallel group's rank 0 gives its own) of `model`'s
    config and weights, with its GGUF blocks as the weights where `quantized` (EngineConfig.quantized_weights; else
    they are read dequantized) and the file they map, whose pages it lets go as it packs them. `options`: the rest of
    ModelRunner's arguments."""
    return make(
        model.config,
        model.weights,
        backend,
        num_blocks=cache.num_blocks,
        block_size=cache.block_size,
        max_model_len=cache.max_model_len,
        max_step_tokens=cache.max_step_tokens,
        quantized=model.quantized if quantized else {},
        mapped=model.mapped,
        **options,
    )
