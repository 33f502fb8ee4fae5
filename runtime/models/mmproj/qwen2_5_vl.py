"""Qwen2.5-VL's vision encoder from llama.cpp's mmproj file (projector "qwen2.5vl_merger"): the VisionConfig, weights
and preprocessing its Hugging Face checkpoint gives (hf_vision_config._qwen2_5_vl), read from what
convert_hf_to_gguf.py --mmproj writes for it (Qwen2VLVisionModel), beside its text model's `qwen2vl` GGUF.

The file keeps the tower's sizes under `clip.vision.*` (image_size a fixed 560, which the tower does not read), the
SiLU of its gated MLP as `clip.use_silu`, and its full attention layers as `n_wa_pattern`: every n-th layer attends
over the whole picture (the converter takes only fullatt_block_indexes evenly n apart), the others within windows.
It keeps neither the windows' side, which llama.cpp takes as 112 pixels (`clip.vision.window_size` where a file has
one), nor the merge size (2, `spatial_merge_size` where a file has one), nor the RMSNorms' epsilon (its
`layer_norm_epsilon` is the text model's; transformers' tower takes 1e-6, as we do). The fused qkv is stored as
three linears (joined again here), the Conv3d patch embedding as its two frames (mmproj/qwen.py), the merger's
RMSNorm as `v.post_ln` and its linears as `mm.0` and `mm.2`.

Pictures are resized as llama.cpp does them, to 8 to 4096 merged squares, with the file's mean and std, as
Qwen2VLImageProcessor does for that pixel range (Qwen2.5-VL's own processor allows up to 12,845,056 pixels, 16,384
squares: where a picture is larger than llama.cpp's range, llama.cpp's is taken)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sagellm.runtime.models.architectures.hf_vision_config import QWEN_VL_LAYER_NORM_EPS
from sagellm.runtime.models.architectures.vision_weights import TOWER
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.gguf_file import GGUFFile
from sagellm.runtime.models.loaded import ModelLoadError, ProcessorFiles
from sagellm.runtime.models.mmproj.keys import check_projection, clip_key, token_ids
from sagellm.runtime.models.mmproj.qwen import (
    PATCH_HALVES,
    QWEN3_5_TOKENS,
    QWEN_VL_MERGE,
    QWEN_VL_ROPE_THETA,
    qwen3_5_preprocessor,
    qwen_vl_most_tokens,
)
from sagellm.runtime.models.vision_config import VisionConfig

QWEN2_5_VL_PROJECTOR = "qwen2.5vl_merger"  # llama.cpp's clip.projector_type for Qwen2.5-VL's tower and merger
QWEN2_5_VL_TEXT = ("qwen2",)
QWEN2_5_VL_WINDOW = 112  # llama.cpp's attention windows' side in pixels where the file has none
_GLOBAL = {"v.post_ln.weight": "merger.ln_q.weight", "mm.0.weight": "merger.mlp.0.weight",
           "mm.0.bias": "merger.mlp.0.bias", "mm.2.weight": "merger.mlp.2.weight",
           "mm.2.bias": "merger.mlp.2.bias"}  # fmt: skip
_LAYER = {"ln1": "norm1", "ln2": "norm2", "attn_out": "attn.proj", "ffn_gate": "mlp.gate_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}  # fmt: skip
_QKV = ("attn_q", "attn_k", "attn_v")  # the fused qkv's thirds, in its order


def qwen2_5_vl_vision(
    path: Path, file: GGUFFile, text: ModelConfig, tokenizer: Any
) -> tuple[VisionConfig, ProcessorFiles]:
    """The tower and merger as hf_vision_config._qwen2_5_vl reads them from the checkpoint the file was converted
    from (but the most tokens a picture gives: llama.cpp's), and Qwen2VLImageProcessor's settings for them."""
    meta = file.metadata

    def key(name: str) -> int:
        return int(clip_key(path, meta, name))

    hidden, heads, layers = key("embedding_length"), key("attention.head_count"), key("block_count")
    patch = key("patch_size")
    check_projection(path, meta, text)
    if not meta.get("clip.use_silu"):
        raise ModelLoadError(f"{path}: lacks clip.use_silu: Qwen2.5-VL's tower runs a gated SiLU")
    if hidden % heads or (hidden // heads) % 4:
        raise ModelLoadError(f"{path}: {heads} heads over {hidden}: each head's width must divide into four (its 2-D "
                             "rope turns a quarter of it by each axis, twice)")  # fmt: skip
    pattern = key("n_wa_pattern")
    merge = int(meta.get("clip.vision.spatial_merge_size", QWEN_VL_MERGE))
    window = int(meta.get("clip.vision.window_size", QWEN2_5_VL_WINDOW))
    if pattern < 1 or window % (patch * merge):
        raise ModelLoadError(f"{path}: n_wa_pattern {pattern} and windows of {window} pixels do not make windows of "
                             f"merged squares of {patch * merge} pixels")  # fmt: skip
    vision = VisionConfig(
        tower="qwen2_5_vl", hidden_size=hidden, intermediate_size=key("feed_forward_length"), num_layers=layers,
        num_heads=heads, num_channels=3, patch_size=patch, image_size=0, layer_norm_eps=QWEN_VL_LAYER_NORM_EPS,
        activation="silu", feature_layers=(layers,), drop_class=False, projector="qwen_merger",
        projector_activation="gelu", projector_bias=True, text_hidden_size=text.hidden_size,
        image_token_id=token_ids(path, tokenizer, QWEN3_5_TOKENS, "Qwen2.5-VL")["image"],
        max_soft_tokens=qwen_vl_most_tokens(meta, patch * merge), rope_theta=QWEN_VL_ROPE_THETA,
        spatial_merge_size=merge, temporal_patch_size=len(PATCH_HALVES), window_size=window,
        full_attention_layers=tuple(i for i in range(layers) if (i + 1) % pattern == 0),
    )  # fmt: skip
    return vision, ProcessorFiles(path, qwen3_5_preprocessor(path, meta, vision))


def qwen2_5_vl_graph_weights(path: Path, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors under the graph's names: the patch embedding's two frames and each block's q, k and v
    joined again."""
    if not all(half in stored for half in PATCH_HALVES):
        raise ModelLoadError(f"{path}: lacks the patch embedding's two frames ({' and '.join(PATCH_HALVES)})")
    weights = {TOWER + "patch_embed.proj.weight": torch.stack([stored[h] for h in PATCH_HALVES], dim=2)}  # [D,C,2,p,p]
    for name, values in stored.items():
        parts = name.split(".")  # v.blk.{i}.{part}.{weight|bias}
        if name in PATCH_HALVES:
            continue
        if name in _GLOBAL:
            weights[TOWER + _GLOBAL[name]] = values
        elif len(parts) == 5 and parts[:2] == ["v", "blk"] and parts[3] in _LAYER:
            weights[f"{TOWER}blocks.{parts[2]}.{_LAYER[parts[3]]}.{parts[4]}"] = values
        elif len(parts) == 5 and parts[:2] == ["v", "blk"] and parts[3] in _QKV:
            thirds = [stored.get(f"v.blk.{parts[2]}.{third}.{parts[4]}") for third in _QKV]
            if any(third is None for third in thirds):
                raise ModelLoadError(f"{path}: block {parts[2]} lacks one of its attention's q, k and v {parts[4]}s")
            weights[f"{TOWER}blocks.{parts[2]}.attn.qkv.{parts[4]}"] = torch.cat(thirds)  # [3D, ...]
        else:
            raise ModelLoadError(f"{path}: tensor {name} is not one a Qwen2.5-VL mmproj holds")
    return weights
