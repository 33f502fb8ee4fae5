"""Loads a Hugging Face model directory: config.json (+ generation_config.json), *.safetensors (single file or
sharded with model.safetensors.index.json) and the tokenizer files.

Hugging Face names are already our canonical names, so this loader reads, casts and checks them, with two
translations to the form the graph reads (and llama.cpp's GGUF files hold): Gemma's norm weights, stored as offsets
from 1, become the weights themselves, Phi-3's fused projections are split into the Llama names, and Qwen's experts
take Mixtral's names."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sagellm.runtime.models.architectures import BY_NAME, canonical_name, check_weights, config_from_hf, fused_parts
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.loaded import LoadedModel, ModelLoadError, describe, read_json
from sagellm.runtime.models.sampling_defaults import from_generation_config
from sagellm.runtime.models.tokenizer import load_hf_tokenizer, read_hf_chat_template

INDEX_FILE = "model.safetensors.index.json"


def load_hf_dir(model_dir: Path, *, dtype: torch.dtype, load_tokenizer: bool, load_weights: bool) -> LoadedModel:
    generation_path = model_dir / "generation_config.json"
    generation = read_json(generation_path) if generation_path.is_file() else None
    config = config_from_hf(read_json(model_dir / "config.json"), generation, model_dir / "config.json")
    weights = _read_weights(model_dir, config, dtype) if load_weights else {}
    tokenizer = load_hf_tokenizer(model_dir) if load_tokenizer else None
    template = read_hf_chat_template(model_dir)
    defaults = from_generation_config(generation)
    return LoadedModel(config, weights, tokenizer, template, model_dir, model_dir.name, sampling_defaults=defaults)


def _read_weights(model_dir: Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    offset_norms = BY_NAME[config.architecture].gemma
    for path in _safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for stored in f.keys():  # noqa: SIM118 -- safe_open is not a Mapping
                    name = canonical_name(config, stored)
                    if name is None or _ignored(name, config):
                        continue
                    tensor = f.get_tensor(stored)
                    if offset_norms and name.endswith("norm.weight"):  # Gemma scales by (1 + w), in float32
                        tensor = 1.0 + tensor.float()
                    tensor = tensor.to(dtype)
                    parts = fused_parts(config, name)
                    if parts is None:
                        weights[name] = tensor
                    else:
                        weights |= {part: tensor[start:end] for part, start, end in parts}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{path}: corrupt or truncated safetensors file: {describe(e)}") from e
    check_weights(config, {name: tuple(t.shape) for name, t in weights.items()}, model_dir)
    return weights


def _safetensors_files(model_dir: Path) -> list[Path]:
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index_path}: no weight_map")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise ModelLoadError(f"{index_path}: lists shard {missing[0]}, which is not in the directory")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights (PyTorch .bin checkpoints are not supported)")
    return files


def _ignored(name: str, config: ModelConfig) -> bool:
    """Tensors some checkpoints carry that the graph recomputes or shares: rope tables, a tied lm_head copy."""
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")
