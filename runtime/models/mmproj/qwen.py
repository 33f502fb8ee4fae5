"""Qwen3.5's vision encoder from llama.cpp's mmproj file: the VisionConfig, weights and preprocessing its Hugging Face
checkpoint gives (hf_vision_config._qwen3_5), read from what convert_hf_to_gguf.py --mmproj writes for it
(Qwen3VLVisionModel: projector "qwen3vl_merger", which Qwen3-VL's files share, told apart by their deepstack layers).

The file keeps the tower's sizes under `clip.vision.*`, its learned positions' square as `image_size` (their side in
patches times patch_size), the merger's square as `spatial_merge_size`, and Qwen's LayerNorms' epsilon from the text
model's rms_norm_eps (its tower's are 1e-6 in transformers, which we take). The Conv3d patch embedding is stored as
the two conv2d halves llama.cpp runs (`v.patch_embd.weight` the first frame's, `.weight.1` the second's: the
converter takes temporal_patch_size 2 only), joined again into the graph's [D, C, 2, p, p]; the merger's norm is
`v.post_ln`, its linears `mm.0` and `mm.2`. The file has no image processor's pixel range: llama.cpp resizes a
picture to 8 to 4096 merged squares (its own defaults, which `clip.vision.image_min_pixels` / `image_max_pixels`
override where a file has them), with the file's mean and std, as Qwen2VLImageProcessor does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sagellm.runtime.models.architectures.hf_vision_config import QWEN_VL_LAYER_NORM_EPS
from sagellm.runtime.models.architectures.vision_weights import TOWER
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.mmproj.keys import check_projection, clip_key, graph_name, image_statistics, token_ids
from sagellm.runtime.models.vision_config import VisionConfig

QWEN3_5_PROJECTOR = "qwen3vl_merger"  # llama.cpp's clip.projector_type for Qwen3-VL's and Qwen3.5's towers
QWEN3_5_TEXT = ("qwen3_5", "qwen3_5_moe")  # the text models it goes beside
QWEN3_5_TOKENS = {"image": "<|image_pad|>"}  # what the processor expands, one per merged square
QWEN_VL_MERGE = 2  # llama.cpp's spatial_merge_size where the file has none
QWEN_VL_TOKENS = (8, 4096)  # llama.cpp's fewest and most merged squares a picture is resized to (qwen3vl_merger's)
QWEN_VL_ROPE_THETA = 10_000.0  # the tower's 2-D rope (transformers' default; llama.cpp's fixed value)
PATCH_HALVES = ("v.patch_embd.weight", "v.patch_embd.weight.1")  # the Conv3d's frames, as two conv2d weights
_GLOBAL = {
    "v.patch_embd.bias": "patch_embed.proj.bias",
    "v.position_embd.weight": "pos_embed.weight",
    "v.post_ln.weight": "merger.norm.weight",
    "v.post_ln.bias": "merger.norm.bias",
    "mm.0.weight": "merger.linear_fc1.weight",
    "mm.0.bias": "merger.linear_fc1.bias",
    "mm.2.weight": "merger.linear_fc2.weight",
    "mm.2.bias": "merger.linear_fc2.bias",
}
_LAYER = {"ln1": "norm1", "ln2": "norm2", "attn_qkv": "attn.qkv", "attn_out": "attn.proj", "ffn_up": "mlp.linear_fc1",
          "ffn_down": "mlp.linear_fc2"}  # fmt: skip


def qwen3_5_vision(path: Path, meta: dict[str, Any], text: ModelConfig, tokenizer: Any) -> VisionConfig:
    """The tower and merger as hf_vision_config._qwen3_5 reads them from the checkpoint the file was converted from."""

    def key(name: str) -> int:
        return int(clip_key(path, meta, name))

    hidden, heads, layers = key("embedding_length"), key("attention.head_count"), key("block_count")
    patch = key("patch_size")
    check_projection(path, meta, text)
    if any(bool(flag) for flag in meta.get("clip.vision.is_deepstack_layers", ())):
        raise ModelLoadError(f"{path}: a tower with deepstack layers (Qwen3-VL's) is not Qwen3.5's")
    if not meta.get("clip.use_gelu"):
        raise ModelLoadError(f"{path}: lacks clip.use_gelu: Qwen3.5's tower runs a GELU")
    if hidden % heads or (hidden // heads) % 4:
        raise ModelLoadError(f"{path}: {heads} heads over {hidden}: each head's width must divide into four (its 2-D "
                             "rope turns a quarter of it by each axis, twice)")  # fmt: skip
    merge = int(meta.get("clip.vision.spatial_merge_size", QWEN_VL_MERGE))
    side = key("image_size") // patch  # the learned positions' square, in patches
    return VisionConfig(
        tower="qwen3_5", hidden_size=hidden, intermediate_size=key("feed_forward_length"), num_layers=layers,
        num_heads=heads, num_channels=3, patch_size=patch, image_size=0, layer_norm_eps=QWEN_VL_LAYER_NORM_EPS,
        activation="gelu_tanh", feature_layers=(layers,), drop_class=False, projector="qwen_merger",
        projector_activation="gelu", projector_bias=True, text_hidden_size=text.hidden_size,
        image_token_id=token_ids(path, tokenizer, QWEN3_5_TOKENS, "Qwen3.5")["image"],
        max_soft_tokens=qwen_vl_most_tokens(meta, patch * merge), rope_theta=QWEN_VL_ROPE_THETA,
        spatial_merge_size=merge, temporal_patch_size=len(PATCH_HALVES), num_position_embeddings=side * side,
    )  # fmt: skip


def qwen3_5_preprocessor(path: Path, meta: dict[str, Any], vision: VisionConfig) -> dict[str, Any]:
    """The preprocessor_config.json the file implies (Qwen2VLImageProcessor's settings)."""
    least, most = _pixel_range(meta, vision.patch_size * vision.spatial_merge_size)
    return {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": vision.patch_size,
            "merge_size": vision.spatial_merge_size, "temporal_patch_size": vision.temporal_patch_size,
            "min_pixels": least, "max_pixels": most, **image_statistics(path, meta)}  # fmt: skip


def qwen3_5_graph_weights(path: Path, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors under the graph's names, the patch embedding's two halves joined along its frames."""
    if not all(half in stored for half in PATCH_HALVES):
        raise ModelLoadError(f"{path}: lacks the patch embedding's two frames ({' and '.join(PATCH_HALVES)})")
    frames = [stored[half] for half in PATCH_HALVES]  # [D, C, p, p] each
    weights = {TOWER + "patch_embed.proj.weight": torch.stack(frames, dim=2)}  # [D, C, 2, p, p]
    for name, values in stored.items():
        if name in PATCH_HALVES:
            continue
        if (ours := graph_name(name, _GLOBAL, _LAYER, "blocks.{}.")) is None:
            raise ModelLoadError(f"{path}: tensor {name} is not one a Qwen3.5 mmproj holds")
        weights[TOWER + ours] = values
    return weights


def qwen_vl_most_tokens(meta: dict[str, Any], square: int) -> int:
    """The most merged squares of `square` pixels a side a picture is resized to (`_pixel_range`)."""
    return _pixel_range(meta, square)[1] // square**2


def _pixel_range(meta: dict[str, Any], square: int) -> tuple[int, int]:
    """The fewest and most pixels a picture is resized to: the file's, else llama.cpp's merged squares of `square`
    pixels a side."""
    least, most = (n * square * square for n in QWEN_VL_TOKENS)
    return int(meta.get("clip.vision.image_min_pixels", least)), int(meta.get("clip.vision.image_max_pixels", most))
