"""A Qwen2-Audio checkpoint (tests/tiny_audio_models.make_tiny_qwen2_audio, its tower three layers deep:
`make_tiny_qwen2_audio_for_llama_cpp`) as llama.cpp's convert_hf_to_gguf.py writes it: its text model as a `qwen2`
GGUF (`write_tiny_qwen2_audio_gguf`) and its audio tower and projector as the `--mmproj` file
(`write_tiny_qwen2_audio_mmproj`).

The mmproj writer was checked against that converter's own file for make_tiny_qwen2_audio_for_llama_cpp
(`--outtype f32`): the same keys, values, tensor names, types, shapes and values (but general.size_label, which
names the parameter count); tests/multimodal/test_qwen2_audio_gguf.py checks it again where the converter is on the
machine. llama.cpp has no text converter for Qwen2AudioForConditionalGeneration (its text model is a Qwen2, which
one converts as a Qwen2ForCausalLM): the text GGUF is tests/tiny_models.write_tiny_gguf's file of it."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from tests.tiny_audio_models import make_tiny_qwen2_audio
from tests.tiny_models import _randomize_and_save, write_tiny_gguf

TEXT_PREFIX = "language_model."  # Qwen2AudioForConditionalGeneration's text model's tensors
AUDIO_PREFIXES = ("audio_tower.", "multi_modal_projector.")  # its tower's and projector's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CONVERTER_LAYERS = 3  # the converter maps `audio_tower.conv{i}` as block i: conv2 needs a tower of three blocks


def make_tiny_qwen2_audio_for_llama_cpp(directory: str | Path, seed: int = 0) -> Path:
    """make_tiny_qwen2_audio's checkpoint with a tower of CONVERTER_LAYERS layers (the same sizes otherwise), which
    llama.cpp's converter takes (it cannot name a 2-layer tower's second convolution)."""
    from transformers import AutoTokenizer, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    path = make_tiny_qwen2_audio(directory, seed)
    config = Qwen2AudioConfig.from_pretrained(path)
    config.audio_config.encoder_layers = CONVERTER_LAYERS
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    return _randomize_and_save(path, model, AutoTokenizer.from_pretrained(path))


def write_tiny_qwen2_audio_gguf(path: str | Path, hf_dir: str | Path) -> Path:
    """The text model of the Qwen2-Audio checkpoint in `hf_dir` as a GGUF: write_tiny_gguf's `qwen2` file of the
    Qwen2ForCausalLM it holds."""
    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        text = Path(scratch)
        causal = config["text_config"] | {"architectures": ["Qwen2ForCausalLM"]}
        (text / "config.json").write_text(json.dumps(causal))
        tensors = load_file(hf_dir / "model.safetensors")
        save_file({name.removeprefix(TEXT_PREFIX): values for name, values in tensors.items()
                   if name.startswith(TEXT_PREFIX)}, text / "model.safetensors")  # fmt: skip
        for name in TOKENIZER_FILES:
            shutil.copy(hf_dir / name, text / name)
        write_tiny_gguf(path, text)
    return path


def write_tiny_qwen2_audio_mmproj(path: str | Path, hf_dir: str | Path) -> Path:
    """The audio tower and projector of the Qwen2-Audio checkpoint in `hf_dir` as llama.cpp's `convert_hf_to_gguf.py
    --mmproj --outtype f32` writes them (its WhisperEncoderModel): general.type "mmproj", `clip.has_audio_encoder`,
    the `clip.audio.*` sizes, the mel bins, epsilon 1e-5 (the converter's default: Qwen2-Audio's config has no
    layer_norm_eps), projector "qwen2a"; gguf-py's `a.*` names, the convolutions' weights in F16 (forced) and their
    biases as [D, 1] columns, the projector as `mm.a.fc`."""
    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    audio = config["audio_config"]
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(hf_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_clip_has_audio_encoder(True)
    writer.add_audio_projection_dim(config["text_config"]["hidden_size"])
    writer.add_audio_embedding_length(audio["d_model"])
    writer.add_audio_feed_forward_length(audio["encoder_ffn_dim"])
    writer.add_audio_block_count(audio["encoder_layers"])
    writer.add_audio_head_count(audio["encoder_attention_heads"])
    writer.add_clip_projector_type(gguf.VisionProjectorType.QWEN2A)
    writer.add_audio_num_mel_bins(audio["num_mel_bins"])
    writer.add_audio_attention_layernorm_eps(1e-5)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, audio["encoder_layers"])
    for name, values in load_file(hf_dir / "model.safetensors").items():
        if not name.startswith(AUDIO_PREFIXES):
            continue
        base, _, kind = name.removeprefix("multi_modal_projector").rpartition(".")
        base = "audio.multi_modal_projector" + base if name.startswith("multi_modal_projector") else base
        values = values.astype(np.float32)
        if name.endswith(("conv1.bias", "conv2.bias")):
            values = values[:, None]
        elif ".conv" in name and kind == "weight":
            values = values.astype(np.float16)
        writer.add_tensor(f"{names.get_name(base)}.{kind}", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
