"""Idefics3's and SmolVLM's vision encoder from llama.cpp's mmproj file (projector "idefics3"): the VisionConfig,
weights and preprocessing their Hugging Face checkpoints give (hf_vision_config._idefics3), read from what
convert_hf_to_gguf.py --mmproj writes for them (SmolVLMModel, which takes both classes).

The file keeps the tower's sizes under `clip.vision.*` (image_size the tile's side), the pixel shuffle's square as
`projector.scale_factor`, the processor's longest edge as `preproc_image_size` and its mean and std; the tower's
activation is the tanh GELU both families' configs have (`clip.use_gelu`: clip.cpp's tanh GELU). Tensors are
gguf-py's `v.*` names and the connector's one linear `mm.model.fc`. The LayerNorms' epsilon is the file's: the
converter writes 1e-5 for a vision_config without layer_norm_eps (SmolVLM's hub configs), where transformers takes
its 1e-6 (llama.cpp runs the file's).

Pictures are preprocessed as Idefics3ImageProcessor does (SmolVLM's only differs in its defaults, which the file
sets): the longest edge resized to `preproc_image_size`, cut into tiles of image_size with the whole picture shrunk
to one after them, each tile's run of image tokens between its row and column tags. llama.cpp cuts its tiles the
same way (its llava-uhd slicing with Idefics3's template)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sagellm.runtime.models.architectures.vision_weights import PROJECTOR
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.gguf_file import GGUFFile
from sagellm.runtime.models.loaded import ModelLoadError, ProcessorFiles
from sagellm.runtime.models.mmproj.keys import (
    check_projection,
    clip_float,
    clip_key,
    image_statistics,
    token_ids,
)
from sagellm.runtime.models.mmproj.vit import vit_graph_weights
from sagellm.runtime.models.vision_config import VisionConfig

IDEFICS3_PROJECTOR = "idefics3"  # llama.cpp's clip.projector_type for Idefics3's and SmolVLM's connector
IDEFICS3_TEXT = ("llama",)
IDEFICS3_TOKENS = {"image": "<image>"}
IDEFICS3_SCALE = 2  # llama.cpp's scale factor where the file has none (the converter always writes one)
_PROJECTOR = {"mm.model.fc.weight": PROJECTOR + "modality_projection.proj.weight"}


def idefics3_vision(
    path: Path, file: GGUFFile, text: ModelConfig, tokenizer: Any
) -> tuple[VisionConfig, ProcessorFiles]:
    """The tower and connector as hf_vision_config._idefics3 reads them from the checkpoint the file was converted
    from, and the processor settings that checkpoint's processor has."""
    meta = file.metadata

    def key(name: str) -> int:
        return int(clip_key(path, meta, name))

    check_projection(path, meta, text)
    size, patch, layers = key("image_size"), key("patch_size"), key("block_count")
    scale = int(meta.get("clip.vision.projector.scale_factor", IDEFICS3_SCALE))
    grid = size // patch
    if scale < 1 or grid % scale:
        raise ModelLoadError(f"{path}: projector scale factor {scale} does not divide the {grid} x {grid} patches")
    vision = VisionConfig(
        tower="siglip", hidden_size=key("embedding_length"), intermediate_size=key("feed_forward_length"),
        num_layers=layers, num_heads=key("attention.head_count"), num_channels=3, patch_size=patch, image_size=size,
        layer_norm_eps=clip_float(path, meta, "attention.layer_norm_epsilon"), activation="gelu_tanh",
        feature_layers=(layers,), drop_class=False, projector="pixel_shuffle", projector_activation="",
        projector_bias=False, text_hidden_size=text.hidden_size,
        image_token_id=token_ids(path, tokenizer, IDEFICS3_TOKENS, "Idefics3")["image"], scale_factor=scale,
    )  # fmt: skip
    longest = int(meta.get("clip.vision.preproc_image_size", size))
    preprocessor = {"image_processor_type": "Idefics3ImageProcessor", "size": {"longest_edge": longest},
                    "max_image_size": {"longest_edge": size}, **image_statistics(path, meta)}  # fmt: skip
    return vision, ProcessorFiles(path, preprocessor, {"image_seq_len": vision.tokens_per_image})


def idefics3_graph_weights(path: Path, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return vit_graph_weights(path, stored, _PROJECTOR, "Idefics3")
