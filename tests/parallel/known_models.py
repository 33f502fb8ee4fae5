"""Published config.json files of models from under 10B to over 175B parameters, for the planner's tests: written
to disk for `sagellm plan`, translated by the loader's own `config_from_hf` for the planner.

Mixtral-8x7B's experts (`num_local_experts`, `num_experts_per_tok`) reach the planner's `ModelShape` through the
runtime's `ModelConfig`, as `sagellm plan` takes them. The GPT-3-like 175B model keeps GPT-3's
width, depth, heads and MLP parameter count (a gated MLP of 8/3 x hidden instead of GELU's 4 x hidden)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sagellm.runtime.models.architectures.hf_config import config_from_hf
from sagellm.runtime.parallel.model_shape import ModelShape

LLAMA: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}

CONFIGS: dict[str, dict[str, Any]] = {
    "SmolLM2-135M": {
        **LLAMA,
        **dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30),
        **dict(num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True),
    },
    "Llama-3-8B": {
        **LLAMA,
        **dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32),
        **dict(num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    },
    "Llama-2-13B": {
        **LLAMA,
        **dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40),
        **dict(num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    },
    "Llama-3-70B": {
        **LLAMA,
        **dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80),
        **dict(num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    },
    "GPT-3-175B": {
        **LLAMA,
        **dict(vocab_size=50257, hidden_size=12288, intermediate_size=32768, num_hidden_layers=96),
        **dict(num_attention_heads=96, num_key_value_heads=96, max_position_embeddings=2048),
    },
    "Llama-3.1-405B": {
        **LLAMA,
        **dict(vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126),
        **dict(num_attention_heads=128, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0),
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "Mixtral-8x7B": {
        **LLAMA,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32),
        **dict(num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6),
        **dict(num_local_experts=8, num_experts_per_tok=2),
    },
}


def shape(name: str) -> ModelShape:
    return ModelShape.of(config_from_hf(CONFIGS[name], None, Path(name)), name)


def write_config(directory: Path, name: str) -> Path:
    """`name`'s config.json in `directory`/`name`, as a model directory without weights."""
    model_dir = directory / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(CONFIGS[name]))
    return model_dir
