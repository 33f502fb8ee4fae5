"""Qwen2-Audio's audio encoder from llama.cpp's mmproj file: the AudioConfig, weights and feature extractor its
Hugging Face checkpoint gives (hf_audio_config.audio_from_hf), read from what convert_hf_to_gguf.py --mmproj writes
for it (conversion/ultravox.py's WhisperEncoderModel: projector "qwen2a", `clip.has_audio_encoder` and no vision
encoder).

The file keeps the tower's sizes under `clip.audio.*` (its LayerNorms' epsilon, its mel bins), its learned positions
as `a.position_embd` (their rows: max_source_positions), the two convolutions as `a.conv1d.{1,2}` (their weights in
F16, as the converter forces them; their biases as [D, 1] columns), the final norm as `a.post_ln` and the projector's
one linear as `mm.a.fc`. The placeholder is the text model's `<|AUDIO|>` (by name in its vocabulary; llama.cpp puts
a clip's embeddings between <|audio_bos|> and <|audio_eos|>, as Qwen2-Audio's chat template does). Clips are turned
into Whisper's log-mel features with llama.cpp's settings for the projector (16 kHz, 30 s windows, a 400-sample FFT
and window, a hop of 160), as WhisperFeatureExtractor does them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sagellm.runtime.models.architectures.audio_weights import AUDIO_PROJECTOR, AUDIO_TOWER, audio_weight_shapes
from sagellm.runtime.models.architectures.weight_shapes import check_weights
from sagellm.runtime.models.audio_config import AudioConfig
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.dequantize import dequantize
from sagellm.runtime.models.gguf_file import GGUFFile
from sagellm.runtime.models.loaded import ModelLoadError, ProcessorFiles
from sagellm.runtime.models.mmproj.keys import graph_name, token_ids

QWEN2_AUDIO_PROJECTOR = "qwen2a"  # llama.cpp's clip.projector_type for Qwen2-Audio's tower
QWEN2_AUDIO_TEXT = ("qwen2",)  # the text models it goes beside
QWEN2_AUDIO_TOKENS = {"audio": "<|AUDIO|>"}  # what the processor repeats, one per embedding
# llama.cpp's log-mel settings for the projector (clip.cpp's audio_* hparams), as WhisperFeatureExtractor's keys
WHISPER_FEATURES = {"feature_extractor_type": "WhisperFeatureExtractor", "sampling_rate": 16000, "chunk_length": 30,
                    "n_fft": 400, "hop_length": 160}  # fmt: skip
_GLOBAL = {
    "a.conv1d.1.weight": AUDIO_TOWER + "conv1.weight",
    "a.conv1d.1.bias": AUDIO_TOWER + "conv1.bias",
    "a.conv1d.2.weight": AUDIO_TOWER + "conv2.weight",
    "a.conv1d.2.bias": AUDIO_TOWER + "conv2.bias",
    "a.position_embd.weight": AUDIO_TOWER + "embed_positions.weight",
    "a.post_ln.weight": AUDIO_TOWER + "layer_norm.weight",
    "a.post_ln.bias": AUDIO_TOWER + "layer_norm.bias",
    "mm.a.fc.weight": AUDIO_PROJECTOR + "linear.weight",
    "mm.a.fc.bias": AUDIO_PROJECTOR + "linear.bias",
}
_LAYER = {"ln1": "self_attn_layer_norm", "ln2": "final_layer_norm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_out": "self_attn.out_proj",
          "ffn_up": "fc1", "ffn_down": "fc2"}  # fmt: skip


def read_audio_mmproj(
    path: Path, file: GGUFFile, text: ModelConfig, tokenizer: Any, dtype: torch.dtype, load_weights: bool
) -> tuple[AudioConfig, dict[str, torch.Tensor], ProcessorFiles]:
    """The audio encoder in `path` (already read: `file`) for the text model `text`, whose `tokenizer` holds its
    placeholder: its config, its weights under the graph's names (empty without `load_weights`), its features'
    settings."""
    meta = file.metadata
    projector = meta.get("clip.audio.projector_type", meta.get("clip.projector_type"))
    if projector != QWEN2_AUDIO_PROJECTOR:
        raise ModelLoadError(f"{path}: audio mmproj projector {projector!r} is not supported (have "
                             f"{QWEN2_AUDIO_PROJECTOR})")  # fmt: skip
    if text.architecture not in QWEN2_AUDIO_TEXT:
        raise ModelLoadError(f"{path}: a Qwen2-Audio mmproj beside a {text.architecture} model")
    audio = _audio(path, file, text, tokenizer)
    weights = _weights(path, file, audio, text, dtype) if load_weights else {}
    features = WHISPER_FEATURES | {"feature_size": audio.num_mel_bins}
    return audio, weights, ProcessorFiles(path, features)


def _audio(path: Path, file: GGUFFile, text: ModelConfig, tokenizer: Any) -> AudioConfig:
    """The tower and projector as audio_from_hf reads them from the checkpoint the file was converted from."""
    meta = file.metadata

    def key(name: str) -> Any:
        if (value := meta.get(f"clip.audio.{name}")) is None:
            raise ModelLoadError(f"{path}: lacks clip.audio.{name}")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    if int(key("projection_dim")) != text.hidden_size:
        raise ModelLoadError(f"{path}: projects to {key('projection_dim')} features; the text model has "
                             f"{text.hidden_size}")  # fmt: skip
    if hidden % heads:
        raise ModelLoadError(f"{path}: {heads} heads do not divide the audio tower's width {hidden}")
    positions = file.tensors.get("a.position_embd.weight")
    if positions is None or len(positions.shape) != 2:
        raise ModelLoadError(f"{path}: lacks a.position_embd.weight, the audio tower's learned positions")
    return AudioConfig(
        hidden_size=hidden, intermediate_size=int(key("feed_forward_length")), num_layers=int(key("block_count")),
        num_heads=heads, num_mel_bins=int(key("num_mel_bins")), max_source_positions=int(positions.shape[0]),
        activation="gelu", layer_norm_eps=float(str(np.float32(key("attention.layer_norm_epsilon")))),
        text_hidden_size=text.hidden_size,
        audio_token_id=token_ids(path, tokenizer, QWEN2_AUDIO_TOKENS, "Qwen2-Audio")["audio"],
    )  # fmt: skip


def _weights(path: Path, file: GGUFFile, audio: AudioConfig, text: ModelConfig, dtype: torch.dtype) -> dict:
    """Every tensor dequantized (the convolutions' F16 as stored) under the graph's names, the convolutions' bias
    columns flat again."""
    weights = {}
    for name, tensor in file.tensors.items():
        if (ours := graph_name(name, _GLOBAL, _LAYER, AUDIO_TOWER + "layers.{}.", tower="a")) is None:
            raise ModelLoadError(f"{path}: tensor {name} is not one a Qwen2-Audio mmproj holds")
        values = torch.from_numpy(dequantize(tensor.data, tensor.kind, tensor.shape).copy()).to(dtype)
        weights[ours] = values.reshape(-1) if name.startswith("a.conv1d.") and name.endswith(".bias") else values
    check_weights(text, {n: tuple(w.shape) for n, w in weights.items()}, path, expected=audio_weight_shapes(audio))
    return weights
