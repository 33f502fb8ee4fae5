"""llama.cpp's multimodal projector file (`--mmproj`): the vision encoder of a GGUF model, as llama.cpp's
convert_hf_to_gguf.py --mmproj writes it (general.type "mmproj", `clip.*` metadata, `v.*` tower and `mm.*`
projector tensors), read into a VisionConfig, weights under the encoder graph's names (vision_weights.py), and the
processor settings the file implies, so a GGUF model sees images as its Hugging Face checkpoint does.

Gemma 3's projector ("gemma3") is read: a SigLIP tower, its patches pooled `clip.vision.projector.scale_factor` to
a side into soft tokens (4 when absent, as llama.cpp defaults it), the soft-token norm stored as 1 + w (what the
graph reads), the projection as Hugging Face stores it ([vision hidden, text hidden], in F16 as the converter
forces it). Its image tokens are the text model's (`<start_of_image>`, `<image_soft_token>`, found by name in its
vocabulary). Images are preprocessed as Gemma3ImageProcessor does, from the file's image size, mean and std.

So are Qwen3.5's and Qwen3-VL's ("qwen3vl_merger", which llama.cpp writes for both: the text model beside it tells
which, mmproj/qwen3_vl.py; Qwen3.5's tower: mmproj/qwen.py), LLaVA-1.5's ("mlp",
from llama.cpp's legacy converter, which writes no general.type: mmproj/llava.py), Idefics3's and SmolVLM's
("idefics3": mmproj/idefics3.py) and Qwen2.5-VL's ("qwen2.5vl_merger": mmproj/qwen2_5_vl.py), each beside
the text models its family has (`_FAMILIES`), and Gemma 4's ("gemma4v": mmproj/gemma4.py). A file of an audio
encoder alone (Qwen2-Audio's "qwen2a": mmproj/audio.py) gives the model's `audio` instead."""

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
from sagellm.runtime.models.audio_config import AudioConfig
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.dequantize import dequantize
from sagellm.runtime.models.gguf_file import CorruptGGUF, GGUFFile, read_gguf
from sagellm.runtime.models.loaded import LoadedModel, ModelLoadError, ProcessorFiles, WeightsOnRead, describe
from sagellm.runtime.models.mmproj.audio import read_audio_mmproj
from sagellm.runtime.models.mmproj.gemma4 import GEMMA4_PROJECTOR, GEMMA4_TEXT, gemma4_graph_weights, gemma4_vision
from sagellm.runtime.models.mmproj.idefics3 import (
    IDEFICS3_PROJECTOR,
    IDEFICS3_TEXT,
    idefics3_graph_weights,
    idefics3_vision,
)
from sagellm.runtime.models.mmproj.keys import check_projection, clip_key, graph_name, image_statistics, token_ids
from sagellm.runtime.models.mmproj.llava import LLAVA_PROJECTOR, LLAVA_TEXT, llava_graph_weights, llava_vision
from sagellm.runtime.models.mmproj.qwen import QWEN3_5_PROJECTOR
from sagellm.runtime.models.mmproj.qwen2_5_vl import (
    QWEN2_5_VL_PROJECTOR,
    QWEN2_5_VL_TEXT,
    qwen2_5_vl_graph_weights,
    qwen2_5_vl_vision,
)
from sagellm.runtime.models.mmproj.qwen3_vl import (
    QWEN3VL_MERGER_TEXT,
    qwen3vl_merger_graph_weights,
    qwen3vl_merger_vision,
)
from sagellm.runtime.models.tokenizer import load_gguf_tokenizer
from sagellm.runtime.models.vision_config import VisionConfig

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
    """`loaded` (a GGUF model) seeing images (hearing audio) through the vision (audio) encoder in `path`: its
    config's `vision` (`audio`), the encoder's weights beside its own, the processor settings the file implies."""
    tokenizer = loaded.tokenizer if loaded.tokenizer is not None else load_gguf_tokenizer(loaded.source)
    mmproj = read_mmproj(path, loaded.config, tokenizer, dtype, load_weights)
    weights = loaded.weights
    if mmproj.weights:
        weights = weights.with_ready(mmproj.weights) if isinstance(weights, WeightsOnRead) else weights | mmproj.weights
    config = replace(loaded.config, vision=mmproj.vision, audio=mmproj.audio)
    return replace(loaded, config=config, weights=weights,
                   processor_files=mmproj.files)  # fmt: skip


@dataclass(frozen=True)
class Mmproj:
    vision: VisionConfig | None  # None for an audio encoder's file (mmproj/audio.py)
    weights: dict[str, torch.Tensor]  # empty when read without them
    files: ProcessorFiles
    audio: AudioConfig | None = None


def read_mmproj(path: Path, text: ModelConfig, tokenizer: Any, dtype: torch.dtype, load_weights: bool = True) -> Mmproj:
    """The vision encoder in `path` for the text model `text`, whose `tokenizer` holds its image tokens."""
    try:
        file = read_gguf(path)
    except (CorruptGGUF, OSError) as e:
        raise ModelLoadError(f"{path}: not a readable GGUF file: {describe(e)}") from e
    meta = file.metadata
    hears_only = meta.get("clip.has_audio_encoder") and not meta.get("clip.has_vision_encoder")
    if hears_only and meta.get("general.type") == "mmproj":  # an audio encoder's (Qwen2-Audio's)
        audio, weights, files = read_audio_mmproj(path, file, text, tokenizer, dtype, load_weights)
        return Mmproj(None, weights, files, audio)
    legacy = "mmproj" if meta.get("general.architecture") == "clip" else None  # the legacy converter writes no type
    if meta.get("general.type", legacy) != "mmproj" or not meta.get("clip.has_vision_encoder"):
        raise ModelLoadError(f"{path}: not an mmproj file with a vision encoder (general.type "
                             f"{meta.get('general.type')!r})")  # fmt: skip
    projector = meta.get("clip.vision.projector_type", meta.get("clip.projector_type"))
    if projector not in _FAMILIES:
        raise ModelLoadError(f"{path}: mmproj projector {projector!r} is not supported (have {', '.join(PROJECTORS)})")
    family = _FAMILIES[projector]
    if text.architecture not in family.texts:
        raise ModelLoadError(f"{path}: a {family.name} mmproj beside a {text.architecture} model")
    vision, files = family.vision(path, file, text, tokenizer)
    weights = _weights(path, file, vision, text, dtype, family.graph_weights) if load_weights else {}
    return Mmproj(vision, weights, files)


@dataclass(frozen=True)
class _Family:
    name: str
    texts: tuple[str, ...]  # the text models (ModelConfig.architecture) it goes beside
    # its VisionConfig and processor settings, from the file (path, its contents, the text model and its tokenizer)
    vision: Callable[[Path, GGUFFile, ModelConfig, Any], tuple[VisionConfig, ProcessorFiles]]
    graph_weights: Callable[[Path, dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # the file's, renamed


def _gemma3(path: Path, file: GGUFFile, text: ModelConfig, tokenizer: Any) -> tuple[VisionConfig, ProcessorFiles]:
    vision = _gemma3_vision(path, file.metadata, text, tokenizer)
    size = vision.image_size
    preprocessor = {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": size, "width": size},
                    **image_statistics(path, file.metadata)}  # fmt: skip
    return vision, ProcessorFiles(path, preprocessor, {"image_seq_length": vision.tokens_per_image})


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
        if (ours := graph_name(name, _GLOBAL, _LAYER, TOWER + "encoder.layers.{}.")) is None:
            raise ModelLoadError(f"{path}: tensor {name} is not one a Gemma 3 mmproj holds")
        weights[ours] = values
    return weights


_FAMILIES = {
    "gemma3": _Family("Gemma 3", ("gemma3_text",), _gemma3, _gemma3_graph_weights),
    QWEN3_5_PROJECTOR: _Family(
        "Qwen3-VL or Qwen3.5", QWEN3VL_MERGER_TEXT, qwen3vl_merger_vision, qwen3vl_merger_graph_weights
    ),
    LLAVA_PROJECTOR: _Family("LLaVA", LLAVA_TEXT, llava_vision, llava_graph_weights),
    IDEFICS3_PROJECTOR: _Family("Idefics3", IDEFICS3_TEXT, idefics3_vision, idefics3_graph_weights),
    QWEN2_5_VL_PROJECTOR: _Family("Qwen2.5-VL", QWEN2_5_VL_TEXT, qwen2_5_vl_vision, qwen2_5_vl_graph_weights),
    GEMMA4_PROJECTOR: _Family("Gemma 4", GEMMA4_TEXT, gemma4_vision, gemma4_graph_weights),
}
PROJECTORS = tuple(_FAMILIES)  # the clip.projector_type values read
