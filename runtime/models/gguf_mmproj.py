"""llama.cpp's multimodal projector file (`--mmproj`): the vision encoder of a GGUF model, as llama.cpp's
convert_hf_to_gguf.py --mmproj writes it (general.type "mmproj", `clip.*` metadata, `v.*` tower and `mm.*`
projector tensors), read into a VisionConfig, weights under the encoder graph's names (vision_weights.py), and the
processor settings the file implies, so a GGUF model sees images as its Hugging Face checkpoint does.

Gemma 3's projector ("gemma3") is read: a SigLIP tower, its patches pooled `clip.vision.projector.scale_factor` to
a side into soft tokens (4 when absent, as llama.cpp defaults it), the soft-token norm stored as 1 + w (what the
graph reads), the projection as Hugging Face stores it ([vision hidden, text hidden], in F16 as the converter
forces it). Its image tokens are the text model's (`<start_of_image>`, `<image_soft_token>`, found by name in its
vocabulary). Images are preprocessed as Gemma3ImageProcessor does, from the file's image size, mean and std.

So is Qwen3.5's ("qwen3vl_merger", which llama.cpp writes for Qwen3-VL too: gguf_mmproj_qwen.py), beside a Qwen3.5
text model."""

from __future__ import annotations

from collections.abc import Callable
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
from sagellm.runtime.models.gguf_mmproj_keys import check_projection, clip_key, image_statistics, token_ids
from sagellm.runtime.models.gguf_mmproj_qwen import (
    QWEN3_5_PROJECTOR,
    QWEN3_5_TEXT,
    qwen3_5_graph_weights,
    qwen3_5_preprocessor,
    qwen3_5_vision,
)
from sagellm.runtime.models.loaded import LoadedModel, ModelLoadError, ProcessorFiles, WeightsOnRead, describe
from sagellm.runtime.models.tokenizer import load_gguf_tokenizer
from sagellm.runtime.models.vision_config import VisionConfig

PROJECTORS = ("gemma3", QWEN3_5_PROJECTOR)  # the clip.projector_type values read
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
    if projector == QWEN3_5_PROJECTOR:
        if text.architecture not in QWEN3_5_TEXT:
            raise ModelLoadError(f"{path}: a Qwen3.5 mmproj beside a {text.architecture} model")
        vision = qwen3_5_vision(path, meta, text, tokenizer)
        weights = _weights(path, file, vision, text, dtype, qwen3_5_graph_weights) if load_weights else {}
        return Mmproj(vision, weights, ProcessorFiles(path, qwen3_5_preprocessor(path, meta, vision)))
    if text.architecture != "gemma3_text":
        raise ModelLoadError(f"{path}: a Gemma 3 mmproj beside a {text.architecture} model")
    vision = _gemma3_vision(path, meta, text, tokenizer)
    weights = _weights(path, file, vision, text, dtype, _gemma3_graph_weights) if load_weights else {}
    size = vision.image_size
    preprocessor = {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": size, "width": size},
                    **image_statistics(path, meta)}  # fmt: skip
    return Mmproj(vision, weights, ProcessorFiles(path, preprocessor, {"image_seq_length": vision.tokens_per_image}))


def _gemma3_vision(path: Path, meta: dict[str, Any], text: ModelConfig, tokenizer: Any) -> VisionConfig:
    def key(name: str) -> Any:
        return clip_key(path, meta, name)

    size, patch = int(key("image_size")), int(key("patch_size"))
    pool = int(meta.get("clip.vision.projector.scale_factor", GEMMA3_POOL))
    grid = size // patch
    check_projection(path, meta, text)
    if pool < 1 or grid % pool:
        raise ModelLoadError(f"{path}: projector scale factor {pool} does not divide the {grid} x {grid} patches")
    ids = token_ids(path, tokenizer, GEMMA3_TOKENS, "Gemma 3")
    return VisionConfig(
        tower="siglip", hidden_size=int(key("embedding_length")), intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")), num_heads=int(key("attention.head_count")), num_channels=3,
        patch_size=patch, image_size=size, layer_norm_eps=float(key("attention.layer_norm_epsilon")),
        activation="gelu_tanh", feature_layers=(int(key("block_count")),), drop_class=False, projector="pooled",
        projector_activation="", projector_bias=False, text_hidden_size=text.hidden_size,
        image_token_id=ids["image"], pooled_side=grid // pool, placeholder_token_id=ids["boi"], bidirectional=True,
    )  # fmt: skip


def _weights(
    path: Path,
    file: GGUFFile,
    vision: VisionConfig,
    text: ModelConfig,
    dtype: torch.dtype,
    graph_weights: Callable[[Path, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Every tensor dequantized (an mmproj is small, and mostly F32 and F16), under the graph's names
    (`graph_weights`: the family's, from the file's)."""
    stored = {}
    for name, tensor in file.tensors.items():
        values = dequantize(tensor.data, tensor.kind, tensor.shape)
        stored[name] = torch.from_numpy(values.copy()).to(dtype)
    weights = graph_weights(path, stored)
    check_weights(text, {n: tuple(w.shape) for n, w in weights.items()}, path,
                  expected=vision_weight_shapes(vision))  # fmt: skip
    return weights


def _gemma3_graph_weights(path: Path, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = {}
    for name, values in stored.items():
        if (ours := _gemma3_name(name)) is None:
            raise ModelLoadError(f"{path}: tensor {name} is not one a Gemma 3 mmproj holds")
        weights[ours] = values
    return weights


def _gemma3_name(name: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".")  # v.blk.{i}.{part}.{weight|bias}
    if len(parts) == 5 and parts[:2] == ["v", "blk"] and parts[3] in _LAYER:
        return f"{TOWER}encoder.layers.{parts[2]}.{_LAYER[parts[3]]}.{parts[4]}"
    return None
