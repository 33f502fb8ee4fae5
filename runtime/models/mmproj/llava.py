"""LLaVA's vision encoder from llama.cpp's mmproj file (projector "mlp"): the VisionConfig, weights and preprocessing
its Hugging Face checkpoint gives (hf_vision_config._llava), read from what llama.cpp's legacy converter writes
(tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py --llava-projector: its own way for LLaVA-1.5's CLIP
towers, which convert_hf_to_gguf.py --mmproj does not take).

That file has no general.type (its `general.architecture` "clip" says what it is), keeps the CLIP tower's own
`projection_dim` (not the text model's width: the projector's second linear says that) and stores the tower
without its last layer: with no `clip.vision.feature_layer` (what it writes when the tower's config has no
vision_feature_layer, LLaVA-1.5's), its `block_count` layers are those up to the second-to-last hidden state, LLaVA's
default, whose last output the projector reads (clip.cpp reads the state before them, one layer short, where the
file lists none; we read what transformers does). Its CLIP layers' MLPs are named the other way round
(mmproj/vit.py); the patch embedding and the projector's linears are F16 whatever the file type. The
projector's GELU and the class row dropped are LLaVA's defaults (the file says neither; llama.cpp does both).

llama.cpp pads a picture to a square of its mean colour and resizes it whole; LLaVA-1.5's Hugging Face processor
(CLIPImageProcessor) resizes its shortest edge and cuts out the middle square: we preprocess as that processor does,
at the file's image size, mean and std."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sagellm.runtime.models.architectures.vision_weights import PROJECTOR
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.gguf_file import GGUFFile
from sagellm.runtime.models.loaded import ModelLoadError, ProcessorFiles
from sagellm.runtime.models.mmproj.keys import clip_float, clip_key, image_statistics, token_ids
from sagellm.runtime.models.mmproj.vit import vit_graph_weights
from sagellm.runtime.models.vision_config import VisionConfig

LLAVA_PROJECTOR = "mlp"  # llama.cpp's clip.projector_type for LLaVA-1.5's two linears
LLAVA_TEXT = ("llama", "mistral", "qwen2")  # the text models LLaVA checkpoints hold
LLAVA_TOKENS = {"image": "<image>"}
_PROJECTOR = {"mm.0.weight": PROJECTOR + "linear_1.weight", "mm.0.bias": PROJECTOR + "linear_1.bias",
              "mm.2.weight": PROJECTOR + "linear_2.weight", "mm.2.bias": PROJECTOR + "linear_2.bias"}  # fmt: skip
_UNREAD = ("v.post_ln.weight", "v.post_ln.bias")  # a CLIP tower's post-norm (its pooled output's only)


def llava_vision(path: Path, file: GGUFFile, text: ModelConfig, tokenizer: Any) -> tuple[VisionConfig, ProcessorFiles]:
    """The tower and projector as hf_vision_config._llava reads them from the checkpoint the file was converted
    from, and the processor settings that checkpoint's LlavaProcessor has."""
    meta = file.metadata

    def key(name: str) -> int:
        return int(clip_key(path, meta, name))

    if "mm.2.weight" not in file.tensors or "mm.0.weight" not in file.tensors:
        raise ModelLoadError(f"{path}: an mlp projector without its two linears (mm.0, mm.2)")
    if (out := file.tensors["mm.2.weight"].shape[0]) != text.hidden_size:
        raise ModelLoadError(f"{path}: projects to {out} features; the text model has {text.hidden_size}")
    stored = key("block_count")
    chosen = meta.get("clip.vision.feature_layer")
    feature_layers = (stored,) if chosen is None else tuple(int(i) for i in chosen)
    if not feature_layers or not all(0 <= i <= stored for i in feature_layers):
        raise ModelLoadError(f"{path}: clip.vision.feature_layer {list(feature_layers)} names no hidden state of its "
                             f"{stored} layers")  # fmt: skip
    size, patch = key("image_size"), key("patch_size")
    vision = VisionConfig(
        tower="clip", hidden_size=key("embedding_length"), intermediate_size=key("feed_forward_length"),
        num_layers=stored + 1 if chosen is None else stored, num_heads=key("attention.head_count"), num_channels=3,
        patch_size=patch, image_size=size, layer_norm_eps=clip_float(path, meta, "attention.layer_norm_epsilon"),
        activation=_activation(meta), feature_layers=feature_layers, drop_class=True, projector="llava_mlp",
        projector_activation="gelu", projector_bias="mm.0.bias" in file.tensors, text_hidden_size=text.hidden_size,
        image_token_id=token_ids(path, tokenizer, LLAVA_TOKENS, "LLaVA")["image"],
    )  # fmt: skip
    preprocessor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
                    "crop_size": {"height": size, "width": size}, **image_statistics(path, meta)}  # fmt: skip
    processor = {"patch_size": patch, "num_additional_image_tokens": 1, "vision_feature_select_strategy": "default"}
    return vision, ProcessorFiles(path, preprocessor, processor)


def llava_graph_weights(path: Path, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return vit_graph_weights(path, stored, _PROJECTOR, "LLaVA", dropped=_UNREAD)


def _activation(meta: dict[str, Any]) -> str:
    """The tower MLP's: clip.cpp's GELU where `clip.use_gelu` (the converter's `hidden_act == "gelu"`), SiLU where
    `clip.use_silu`, else CLIP's quick GELU."""
    if meta.get("clip.use_gelu"):
        return "gelu"
    return "silu" if meta.get("clip.use_silu") else "quick_gelu"
