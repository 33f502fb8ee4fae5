"""The CLIP and SigLIP towers of llama.cpp's mmproj files under the encoder graph's names (vision_weights.py): LLaVA's
("mlp", mmproj/llava.py), Idefics3's ("idefics3", mmproj/idefics3.py) and Gemma 3's share gguf-py's `v.*`
names, but for the MLP's two linears, which llama.cpp's legacy LLaVA converter names the other way round (a CLIP
layer's fc1 as `ffn_down`): as clip.cpp does, a layer's `ffn_down` whose weight reads the tower's width is its first
linear."""

from __future__ import annotations

from pathlib import Path

import torch

from sagellm.runtime.models.architectures.vision_weights import TOWER
from sagellm.runtime.models.loaded import ModelLoadError

_EMBEDDINGS = {
    "v.class_embd": "embeddings.class_embedding",
    "v.patch_embd.weight": "embeddings.patch_embedding.weight",
    "v.patch_embd.bias": "embeddings.patch_embedding.bias",
    "v.position_embd.weight": "embeddings.position_embedding.weight",
    "v.pre_ln.weight": "pre_layrnorm.weight",
    "v.pre_ln.bias": "pre_layrnorm.bias",
    "v.post_ln.weight": "post_layernorm.weight",
    "v.post_ln.bias": "post_layernorm.bias",
}
_LAYER = {"ln1": "layer_norm1", "ln2": "layer_norm2", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_out": "self_attn.out_proj", "ffn_up": "mlp.fc1",
          "ffn_down": "mlp.fc2"}  # fmt: skip
_SWAPPED = {"ffn_up": "mlp.fc2", "ffn_down": "mlp.fc1"}


def vit_graph_weights(
    path: Path, stored: dict[str, torch.Tensor], projector: dict[str, str], family: str, dropped: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """The file's tower tensors and `projector`'s (its name -> the graph's, whole) under the graph's names; those in
    `dropped` left out (what the graph does not read); any other refused naming `family`."""
    width = stored["v.position_embd.weight"].shape[-1] if "v.position_embd.weight" in stored else None
    weights = {}
    for name, values in stored.items():
        if name in dropped:
            continue
        ours = projector.get(name) or _tower_name(name, stored, width)
        if ours is None:
            raise ModelLoadError(f"{path}: tensor {name} is not one a {family} mmproj holds")
        weights[ours] = values
    return weights


def _tower_name(name: str, stored: dict[str, torch.Tensor], width: int | None) -> str | None:
    if name in _EMBEDDINGS:
        return TOWER + _EMBEDDINGS[name]
    parts = name.split(".")  # v.blk.{i}.{part}.{weight|bias}
    if len(parts) != 5 or parts[:2] != ["v", "blk"] or parts[3] not in _LAYER:
        return None
    down = stored.get(f"v.blk.{parts[2]}.ffn_down.weight")
    swapped = down is not None and down.shape[-1] == width  # [D, inter] is fc2's; [inter, D] fc1's
    layer = (_SWAPPED if swapped else {}).get(parts[3], _LAYER[parts[3]])
    return f"{TOWER}encoder.layers.{parts[2]}.{layer}.{parts[4]}"
