"""llama.cpp's multimodal projector file (`--mmproj`): the vision encoder of a GGUF model, as llama.cpp's
convert_hf_to_gguf.py --mmproj writes it (general.type "mmproj", `clip.*` metadata, `v.*` tower and `mm.*`
projector tensors), read into a VisionConfig, weights under the encoder graph's names (vision_weights.py), and the
processor settings the file implies, so a GGUF model sees images as its Hugging Face checkpoint does.

Gemma 3's projector ("gemma3") is read: a SigLIP tower, its patches pooled `clip.vision.projector.scale_factor` to
a side into soft tokens (4 when absent, as llama.cpp defaults it), the soft-token norm stored as 1 + w (what the
graph reads), the projection as Hugging Face stores it ([vision hidden, text hidden], in F16 as the converter
forces it). Its image tokens are the text model's (`<start_of_image>`, `<image_soft_token>`, found by name in its
vocabulary). Images are preprocessed as Gemma3ImageProcessor does, from the file's image size, mean and std."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sagellm.runtime.models.architectures.vision_weights import (
    POOLED_NORM,
    POOLED_PROJECTION,
    TOWER,
    vision_weight_shapes,
)
from sagellm.runtime.models.architectures.weight_shapes import check_weights
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.dequantize import dequantize
from sagellm.runtime.models.gguf_file import CorruptGGUF, GGUFFile, read_gguf
from sagellm.runtime.models.loaded import LoadedModel, ModelLoadError, ProcessorFiles, WeightsOnRead, describe
from sagellm.runtime.models.tokenizer import load_gguf_tokenizer
from sagellm.runtime.models.vision_config import VisionConfig

PROJECTORS = ("gemma3",)  # the clip.projector_type values read
GEMMA3_POOL = 4  # llama.cpp's default clip.vision.projector.scale_factor for Gemma 3 (64 patches a side -> 16)
# Gemma 3's image tokens, as its tokenizers spell them
GEMMA3_TOKENS = {"boi": "<start_of_image>", "image": "<image_soft_token>"}
_GLOBAL = {
    "v.patch_embd.weight": TOWER + "embeddings.patch_embedding.weight",
    "v.patch_embd.bias": TOWER + "embeddings.patch_embedding.bias",
    "v.position_embd.weight": TOWER + "embeddings.position_embedding.weight",
    "v.post_ln.weight": TOWER + "post_layernorm.weight",
    "v.post_ln.bias": TOWER + "post_layernorm.bias",
    "mm.input_projection.weight": POOLED_PROJECTION,
    "mm.soft_emb_norm.weight": POOLED_NORM,
}
_LAYER = {"ln1": "layer_norm1", "ln2": "layer_norm2", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_out": "self_attn.out_proj", "ffn_up": "mlp.fc1",
          "ffn_down": "mlp.fc2"}  # fmt: skip


def with_mmproj(loaded: LoadedModel, path: Path, dtype: torch.dtype, load_weights: bool = True) -> LoadedModel:
    """`loaded` (a GGUF model) seeing images through the vision encoder in `path`: its config's `vision`, the
    encoder's weights beside its own, the processor settings the file implies."""
    tokenizer = loaded.tokenizer if loaded.tokenizer is not None else load_gguf_tokenizer(loaded.source)
    mmproj = read_mmproj(path, loaded.config, tokenizer, dtype, load_weights)
    weights = loaded.weights
    if mmproj.weights:
        weights = weights.with_ready(mmproj.weights) if isinstance(weights, WeightsOnRead) else weights | mmproj.weights
    return replace(loaded, config=replace(loaded.config, vision=mmproj.vision), weights=weights,
                   processor_files=mmproj.files)  # fmt: skip


@dataclass(frozen=True)
class Mmproj:
    vision: VisionConfig
    weights: dict[str, torch.Tensor]  # empty when read without them
    files: ProcessorFiles


def read_mmproj(path: Path, text: ModelConfig, tokenizer: Any, dtype: torch.dtype, load_weights: bool = True) -> Mmproj:
    """The vision encoder in `path` for the text model `text`, whose `tokenizer` holds its image tokens."""
    try:
        file = read_gguf(path)
    except (CorruptGGUF, OSError) as e:
        raise ModelLoadError(f"{path}: not a readable GGUF file: {describe(e)}") from e
    meta = file.metadata
    if meta.get("general.type") != "mmproj" or not meta.get("clip.has_vision_encoder"):
        raise ModelLoadError(f"{path}: not an mmproj file with a vision encoder (general.type "
                             f"{meta.get('general.type')!r})")  # fmt: skip
    projector = meta.get("clip.vision.projector_type", meta.get("clip.projector_type"))
    if projector not in PROJECTORS:
        raise ModelLoadError(f"{path}: mmproj projector {projector!r} is not supported (have {', '.join(PROJECTORS)})")
    if text.architecture != "gemma3_text":
        raise ModelLoadError(f"{path}: a Gemma 3 mmproj beside a {text.architecture} model")
    vision = _gemma3_vision(path, meta, text, tokenizer)
    weights = _weights(path, file, vision, text, dtype) if load_weights else {}
    size, stats = vision.image_size, {}
    for name in ("image_mean", "image_std"):
        if (values := meta.get(f"clip.vision.{name}")) is None or len(values) != 3:
            raise ModelLoadError(f"{path}: lacks clip.vision.{name} (three values)")
        stats[name] = [float(x) for x in values]
    preprocessor = {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": size, "width": size}, **stats}
    return Mmproj(vision, weights, ProcessorFiles(path, preprocessor, {"image_seq_length": vision.tokens_per_image}))


def _gemma3_vision(path: Path, meta: dict[str, Any], text: ModelConfig, tokenizer: Any) -> VisionConfig:
    def key(name: str) -> Any:
        if (value := meta.get(f"clip.vision.{name}")) is None:
            raise ModelLoadError(f"{path}: lacks clip.vision.{name}")
        return value

    size, patch = int(key("image_size")), int(key("patch_size"))
    pool = int(meta.get("clip.vision.projector.scale_factor", GEMMA3_POOL))
    grid = size // patch
    if int(key("projection_dim")) != text.hidden_size:
        raise ModelLoadError(f"{path}: projects to {key('projection_dim')} features; the text model has "
                             f"{text.hidden_size}")  # fmt: skip
    if pool < 1 or grid % pool:
        raise ModelLoadError(f"{path}: projector scale factor {pool} does not divide the {grid} x {grid} patches")
    ids = {}
    for role, token in GEMMA3_TOKENS.items():
        ids[role] = tokenizer.convert_tokens_to_ids(token) if tokenizer is not None else None
        if ids[role] is None or ids[role] == getattr(tokenizer, "unk_token_id", None):
            raise ModelLoadError(f"{path}: the text model's vocabulary has no {token}, which Gemma 3's images need")
    return VisionConfig(
        tower="siglip", hidden_size=int(key("embedding_length")), intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")), num_heads=int(key("attention.head_count")), num_channels=3,
        patch_size=patch, image_size=size, layer_norm_eps=float(key("attention.layer_norm_epsilon")),
        activation="gelu_tanh", feature_layers=(int(key("block_count")),), drop_class=False, projector="pooled",
        projector_activation="", projector_bias=False, text_hidden_size=text.hidden_size,
        image_token_id=ids["image"], pooled_side=grid // pool, placeholder_token_id=ids["boi"], bidirectional=True,
    )  # fmt: skip


def _weights(
    path: Path, file: GGUFFile, vision: VisionConfig, text: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every tensor under the graph's name, dequantized (an mmproj is small, and mostly F32 and F16)."""
    weights = {}
    for name, tensor in file.tensors.items():
        ours = _graph_name(name)
        if ours is None:
            raise ModelLoadError(f"{path}: tensor {name} is not one a Gemma 3 mmproj holds")
        values = dequantize(tensor.data, tensor.kind, tensor.shape)
        weights[ours] = torch.from_numpy(values.copy()).to(dtype)
    check_weights(text, {n: tuple(w.shape) for n, w in weights.items()}, path,
                  expected=vision_weight_shapes(vision))  # fmt: skip
    return weights


def _graph_name(name: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".")  # v.blk.{i}.{part}.{weight|bias}
    if len(parts) == 5 and parts[:2] == ["v", "blk"] and parts[3] in _LAYER:
        return f"{TOWER}encoder.layers.{parts[2]}.{_LAYER[parts[3]]}.{parts[4]}"
    return None
