"""Loads a Hugging Face model directory: config.json (+ generation_config.json), *.safetensors (single file or
sharded with model.safetensors.index.json) and the tokenizer files.

Hugging Face names are already our canonical names, so this loader reads, casts and checks them, with two
translations to the form the graph reads (and llama.cpp's GGUF files hold): Gemma's norm weights, stored as offsets
from 1, become the weights themselves, Phi-3's fused projections are split into the Llama names, and Qwen's experts
and gpt-oss's stacked ones take Mixtral's names. gpt-oss's MXFP4 experts (`*_blocks`, `*_scales`) are kept as their
blocks, repacked into GGUF's MXFP4 (`LoadedModel.quantized`), as the GGUF loader keeps a quantized file's."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sagellm.backends.mxfp4 import Mxfp4LayoutError, experts_from_hf
from sagellm.backends.quantized import QuantizedWeight
from sagellm.runtime.models.architectures.checkpoint_names import (
    canonical_name,
    expert_parts,
    fused_parts,
    stacked_expert_projections,
    take_rows,
)
from sagellm.runtime.models.architectures.families import BY_NAME
from sagellm.runtime.models.architectures.hf_config import config_from_hf
from sagellm.runtime.models.architectures.vision_weights import TOWER
from sagellm.runtime.models.architectures.weight_shapes import check_weights, encoder_weight_shapes
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.loaded import (
    LoadedModel,
    ModelLoadError,
    ProcessorFiles,
    WeightsOnRead,
    describe,
    read_json,
)
from sagellm.runtime.models.mtp_head import HEAD_NORMS, PREFIX, head_weight_shapes, is_head_weight
from sagellm.runtime.models.sampling_defaults import from_generation_config
from sagellm.runtime.models.tokenizer import load_hf_tokenizer, read_hf_chat_template

INDEX_FILE = "model.safetensors.index.json"


def load_hf_dir(
    model_dir: Path,
    *,
    dtype: torch.dtype,
    load_tokenizer: bool,
    load_weights: bool,
    mtp_head: bool = False,
    encoders_only: bool = False,
    language_model_only: bool = False,
) -> LoadedModel:
    """`mtp_head`: read the multi-token prediction head's weights too (mtp_head.py), under their `mtp.` names;
    `encoders_only`: its media encoders' alone (a model that sees images or hears audio); `language_model_only`:
    its text model alone, as if it had no encoders (their tensors not read: canonical_name keeps none)."""
    generation_path = model_dir / "generation_config.json"
    generation = read_json(generation_path) if generation_path.is_file() else None
    config = config_from_hf(read_json(model_dir / "config.json"), generation, model_dir / "config.json")
    if language_model_only:
        config = dataclasses.replace(config, vision=None, audio=None)
    if mtp_head and not config.num_mtp_layers:
        raise ModelLoadError(f"{model_dir}: has no multi-token prediction head (config.json: mtp_num_hidden_layers)")
    if encoders_only and not config.takes_media:
        raise ModelLoadError(f"{model_dir}: has no vision or audio encoder")
    weights, quantized = _read_weights(model_dir, config, dtype, mtp_head, encoders_only) if load_weights else ({}, {})
    tokenizer = load_hf_tokenizer(model_dir) if load_tokenizer else None
    template = read_hf_chat_template(model_dir)
    defaults = from_generation_config(generation)
    files = ProcessorFiles.read(model_dir) if config.takes_media else None
    return LoadedModel(config, weights, tokenizer, template, model_dir, model_dir.name, quantized,
                       sampling_defaults=defaults, processor_files=files)  # fmt: skip


def _read_weights(
    model_dir: Path, config: ModelConfig, dtype: torch.dtype, mtp_head: bool, encoders_only: bool = False
) -> tuple[WeightsOnRead, dict[str, QuantizedWeight]]:
    """The weights under their canonical names, and the MXFP4 experts as blocks (`quantized`; their floats made
    only if read); `encoders_only`: the media encoders' alone, the others never read from the files."""
    vision = encoder_weight_shapes(config) if encoders_only else None
    weights: dict[str, torch.Tensor] = {}
    mxfp4: dict[str, dict[str, torch.Tensor]] = {}  # a stacked expert tensor's blocks and scales, as they are read
    arch = BY_NAME[config.architecture]
    offset_norms = (arch.gemma and not (arch.gemma4 or arch.gemma3n)) or arch.gated_delta_net
    for path in _safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for stored in f.keys():  # noqa: SIM118 -- safe_open is not a Mapping
                    name = _head_name(config, stored) if mtp_head else canonical_name(config, stored)
                    if name is None or _ignored(name, config) or (vision is not None and name not in vision):
                        continue
                    tensor = f.get_tensor(stored)
                    if name.endswith(MXFP4_HALVES):  # a pair may span two shards: joined once all are read
                        stacked, _, half = name.rpartition("_")
                        mxfp4.setdefault(stacked, {})[half] = tensor
                        continue
                    if offset_norms and _offset_norm(name):  # Gemma and Qwen3.5 scale by (1 + w), in float32
                        tensor = 1.0 + tensor.float()
                    if name not in ROW_TABLES or not tensor.is_floating_point() or tensor.itemsize > dtype.itemsize:
                        tensor = tensor.to(dtype)
                    parts = fused_parts(config, name)
                    experts = expert_parts(name, tensor)
                    if parts is not None:
                        weights |= {part: take_rows(tensor, rows) for part, rows in parts}
                    elif experts is not None:
                        weights |= experts
                    else:
                        weights[name] = tensor
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{path}: corrupt or truncated safetensors file: {describe(e)}") from e
    quantized, on_read = _mxfp4_experts(model_dir, mxfp4, dtype, weights)
    loaded = WeightsOnRead(weights, on_read)
    shapes = loaded.shapes()
    if vision is not None:
        check_weights(config, shapes, model_dir, expected=vision)
        return loaded, quantized
    check_weights(config, {name: shape for name, shape in shapes.items() if not is_head_weight(name)}, model_dir)
    if mtp_head:
        head = {name: shape for name, shape in shapes.items() if is_head_weight(name)}
        check_weights(config, head, model_dir, expected=head_weight_shapes(config))
    return loaded, quantized


def _head_name(config: ModelConfig, stored: str) -> str | None:
    """A tensor's name with the MTP head read too: the head's, canonicalized as the model's layers' names are."""
    if not stored.startswith(PREFIX):
        return canonical_name(config, stored)
    name = canonical_name(config, "model." + stored.removeprefix(PREFIX))
    return None if name is None else PREFIX + name.removeprefix("model.")


MXFP4_HALVES = ("_blocks", "_scales")  # gpt-oss's MXFP4 experts: `<name>_blocks` and `<name>_scales`
# Tables only ever read a row per token (Gemma 4's and 3n's per-layer embeddings: 2.3 billion values in E2B), kept in
# the checkpoint's 16-bit type where it is narrower than the model's: the rows read are widened, the table is not.
ROW_TABLES = frozenset({"model.embed_tokens_per_layer.weight"})


def _mxfp4_experts(
    model_dir: Path, halves: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype, dense: dict[str, torch.Tensor]
) -> tuple[dict[str, QuantizedWeight], dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]]:
    """Each expert's projections of the stacked MXFP4 tensors as GGML blocks (gate and up: alternate rows), with
    their floats made only if read; for a dtype the block kernels do not compute in (not float32), their floats
    now, into `dense`."""
    quantized: dict[str, QuantizedWeight] = {}
    on_read: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = {}
    for stacked, pair in halves.items():
        missing = [half for half in ("blocks", "scales") if half not in pair]
        projections = stacked_expert_projections(stacked)
        if missing or projections is None:
            what = f"lacks {stacked}_{missing[0]}" if missing else f"has MXFP4 {stacked}, which no graph reads"
            raise ModelLoadError(f"{model_dir}: {what}")
        prefix, names = projections
        try:
            experts = experts_from_hf(pair["blocks"], pair["scales"])
        except Mxfp4LayoutError as e:
            raise ModelLoadError(f"{model_dir}: {stacked}: {e}") from e
        for e, expert in enumerate(experts):
            for index, projection in enumerate(names):
                rows = expert.blocks[index :: len(names)]
                weight = QuantizedWeight(expert.kind, rows, expert.in_features)
                name = f"{prefix}{e}.{projection}.weight"
                if dtype == torch.float32:
                    quantized[name] = weight
                    on_read[name] = ((rows.shape[0], expert.in_features), functools.partial(_floats, weight))
                else:
                    dense[name] = _floats(weight).to(dtype)
    return quantized, on_read


def _floats(weight: QuantizedWeight) -> torch.Tensor:
    return weight.rows(torch.arange(weight.out_features))  # [out, in] fp32


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


def _offset_norm(name: str) -> bool:
    """An RMSNorm weight stored as its offset from 1: all of a Gemma's or Qwen3.5's (Gemma 3's projector's too), but
    the Gated DeltaNet's output norm and a vision tower's layernorms (stored whole)."""
    norm = name.endswith("norm.weight") or name in HEAD_NORMS
    return norm and not name.endswith("linear_attn.norm.weight") and not name.startswith(TOWER)


def _ignored(name: str, config: ModelConfig) -> bool:
    """Tensors some checkpoints carry that the graph recomputes or shares: rope tables, a tied lm_head copy."""
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")
