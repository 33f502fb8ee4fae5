"""What the tensor parallel tests of the newer architectures (Qwen3.5, Gemma 4 and 3n) start their engines with."""

from __future__ import annotations

from pathlib import Path

from sagellm.runtime.engine.config import EngineConfig

# Prompt lookup that always proposes (mostly rejected by tiny random models): every rank's rollback is exercised.
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "adaptive": False}


def engine_config(path: Path | str, tp: int, **settings) -> EngineConfig:
    """A small CPU engine of `tp` ranks on the model at `path` (blocks of 4, so prompts cross several)."""
    return EngineConfig(model=str(path), backend="cpu", block_size=4, num_kv_blocks=64, tensor_parallel_size=tp,
                        **settings)  # fmt: skip
