"""Gemma 4's vision encoder from llama.cpp's mmproj file: the VisionConfig, weights and preprocessing its Hugging Face
checkpoint gives (hf_vision_config._gemma4), read from what convert_hf_to_gguf.py --mmproj writes for it
(Gemma4VisionAudioModel: projector "gemma4v").

The file keeps the tower's sizes under `clip.vision.*` (image_size a dummy 224) and the RMSNorms' epsilon (the
converter writes 1e-6 whatever the checkpoint's is, as llama.cpp runs it); the rest is llama.cpp's own: the patches
pooled 3 x 3 (`clip.vision.projector.scale_factor` where a file has it), the 2-D rope's theta 100, the GELU (tanh).
The patch embedding is stored as a conv2d's [D, 3, p, p] (transformers' linear over (row, column, channel) patches,
permuted back here), the learned (x, y) position table as it is, a clipped linear's four bounds as 1-element tensors
beside its weight (`v.blk.{i}.attn_q.input_max`, ...), the standardization as `v.std_bias` / `v.std_scale`, the
embedder's one linear as `mm.input_projection`. The image tokens are the text model's (`<|image>`, `<|image|>`,
`<image|>`, by name in its vocabulary). A picture's soft tokens attend both ways in the sliding layers but for
E2B's and E4B's widths (1536, 2560), where they attend causally, as llama.cpp decides it (transformers' config
says it by use_bidirectional_attention "vision" or null).

Pictures are resized as Gemma4ImageProcessor does at its default 280 soft tokens (llama.cpp keeps a picture's size
between 70 and 1120 tokens instead, which transformers' processor cannot say), with the file's mean and std."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sagellm.runtime.models.architectures.hf_vision_config import GEMMA4_DEFAULT_SOFT_TOKENS
from sagellm.runtime.models.architectures.vision_weights import CLIP_BOUNDS, PROJECTOR, TOWER
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.gguf_file import GGUFFile
from sagellm.runtime.models.loaded import ModelLoadError, ProcessorFiles
from sagellm.runtime.models.mmproj.keys import check_projection, clip_float, clip_key, image_statistics, token_ids
from sagellm.runtime.models.vision_config import VisionConfig

GEMMA4_PROJECTOR = "gemma4v"  # llama.cpp's clip.projector_type for Gemma 4's vision tower
GEMMA4_TEXT = ("gemma4_text",)  # the text models it goes beside
GEMMA4_TOKENS = {"boi": "<|image>", "image": "<|image|>", "eoi": "<image|>"}  # as its tokenizers spell them
GEMMA4_POOL = 3  # llama.cpp's pooling kernel where the file has no projector.scale_factor
GEMMA4_ROPE_THETA = 100.0  # the tower's 2-D rope (llama.cpp's fixed value, transformers' default)
AUDIO_TENSORS = ("a.", "mm.a.")  # gguf-py's names of an audio tower's and its projector's tensors
CAUSAL_WIDTHS = (1536, 2560)  # E2B's and E4B's text widths, whose pictures llama.cpp attends causally
_GLOBAL = {
    "v.position_embd.weight": TOWER + "patch_embedder.position_embedding_table",
    "v.std_bias": TOWER + "std_bias",
    "v.std_scale": TOWER + "std_scale",
    "mm.input_projection.weight": PROJECTOR + "embedding_projection.weight",
}
_NORMS = {"ln1": "input_layernorm", "ln2": "pre_feedforward_layernorm", "attn_post_norm": "post_attention_layernorm",
          "ffn_post_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
          "attn_k_norm": "self_attn.k_norm"}  # fmt: skip
_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_out": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}  # fmt: skip


def gemma4_vision(path: Path, file: GGUFFile, text: ModelConfig, tokenizer: Any) -> tuple[VisionConfig, ProcessorFiles]:
    """The tower and embedder as hf_vision_config._gemma4 reads them from the checkpoint the file was converted from,
    and Gemma4ImageProcessor's settings."""
    meta = file.metadata

    def key(name: str) -> int:
        return int(clip_key(path, meta, name))

    hidden, heads, layers = key("embedding_length"), key("attention.head_count"), key("block_count")
    patch = key("patch_size")
    check_projection(path, meta, text)
    if hidden % heads:
        raise ModelLoadError(f"{path}: {heads} heads do not divide the tower's width {hidden}")
    pool = int(meta.get("clip.vision.projector.scale_factor", GEMMA4_POOL))
    positions = file.tensors.get("v.position_embd.weight")
    if positions is None or len(positions.shape) != 3:
        raise ModelLoadError(f"{path}: lacks v.position_embd.weight, the tower's (x, y) position table")
    ids = token_ids(path, tokenizer, GEMMA4_TOKENS, "Gemma 4")
    both_ways = text.hidden_size not in CAUSAL_WIDTHS
    pad = getattr(tokenizer, "pad_token_id", None)
    vision = VisionConfig(
        tower="gemma4", hidden_size=hidden, intermediate_size=key("feed_forward_length"), num_layers=layers,
        num_heads=heads, num_channels=3, patch_size=patch, image_size=0,
        layer_norm_eps=clip_float(path, meta, "attention.layer_norm_epsilon"), activation="gelu_tanh",
        feature_layers=(layers,), drop_class=False, projector="gemma4_embedder", projector_activation="",
        projector_bias=False, text_hidden_size=text.hidden_size, image_token_id=ids["image"], pooling_kernel=pool,
        max_soft_tokens=GEMMA4_DEFAULT_SOFT_TOKENS, position_embedding_size=int(positions.shape[1]),
        rope_theta=GEMMA4_ROPE_THETA, clipped_linears=any(name.endswith(".input_max") for name in file.tensors),
        standardize="v.std_bias" in file.tensors,
        per_layer_token_id=(pad or 0) if text.per_layer_input_size else None,
        around_image=(ids["boi"], ids["eoi"]), bidirectional=both_ways, bidirectional_sliding_only=both_ways,
    )  # fmt: skip
    preprocessor = {"image_processor_type": "Gemma4ImageProcessor", "patch_size": patch, "pooling_kernel_size": pool,
                    "max_soft_tokens": GEMMA4_DEFAULT_SOFT_TOKENS, "do_normalize": True,
                    **image_statistics(path, meta)}  # fmt: skip
    return vision, ProcessorFiles(path, preprocessor)


def gemma4_graph_weights(path: Path, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors under the graph's names: the patch embedding a linear over (row, column, channel) again, a
    clipped linear's bounds scalars again; the audio tower's (E2B's and E4B's files hold it: `a.*`, `mm.a.*`) left,
    as a Hugging Face checkpoint's is (hf_audio_config: Gemma 4's audio is not run)."""
    weights = {}
    for name, values in stored.items():
        if name.startswith(AUDIO_TENSORS):
            continue
        if name == "v.patch_embd.weight":  # [D, 3, p, p] -> [D, p * p * 3]
            weights[TOWER + "patch_embedder.input_proj.weight"] = values.permute(0, 2, 3, 1).reshape(len(values), -1)
        elif (ours := _graph_name(name)) is not None:
            weights[ours] = values.reshape(()) if name.rpartition(".")[2] in CLIP_BOUNDS else values
        else:
            raise ModelLoadError(f"{path}: tensor {name} is not one a Gemma 4 mmproj holds")
    return weights


def _graph_name(name: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".")  # v.blk.{i}.{part}.{weight|input_max|...}
    if len(parts) != 5 or parts[:2] != ["v", "blk"]:
        return None
    layer = f"{TOWER}encoder.layers.{parts[2]}."
    if parts[3] in _NORMS and parts[4] == "weight":
        return f"{layer}{_NORMS[parts[3]]}.weight"
    if parts[3] in _LINEARS and parts[4] == "weight":
        return f"{layer}{_LINEARS[parts[3]]}.linear.weight"
    if parts[3] in _LINEARS and parts[4] in CLIP_BOUNDS:
        return f"{layer}{_LINEARS[parts[3]]}.{parts[4]}"
    return None
