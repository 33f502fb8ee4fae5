"""A Gemma 4 checkpoint with its vision tower (tests/tiny_vision_models.make_tiny_gemma4_vision) as llama.cpp's
convert_hf_to_gguf.py writes it: its text model as a `gemma4` GGUF (`write_tiny_gemma4_gguf`) and its tower and
embedder as the `--mmproj` file (`write_tiny_gemma4_mmproj`).

The mmproj writer was checked against that converter's own file for make_tiny_gemma4_vision (`--outtype f32`, with
and without clipped linears and standardization): the same keys, values, tensor names, types, shapes and values
(but general.size_label, which names the parameter count); tests/multimodal/test_gemma4_gguf.py checks it again
where the converter is on the machine. The converter does not write the tiny checkpoint's text GGUF (its Gemma 4
vocabulary wants a Llama BPE tokenizer the tiny one is not): that file is tests/tiny_models.write_tiny_gguf's, as
every Gemma 4 text test takes it."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file, save_file

from sagellm.runtime.models.architectures.vision_weights import CLIP_BOUNDS
from tests.tiny_models import write_tiny_gguf

TEXT_PREFIX = "model.language_model."  # Gemma4ForConditionalGeneration's text model's tensors
TOWER_PREFIX = "model.vision_tower."  # its tower's
EMBEDDER = "model.embed_vision.embedding_projection.weight"  # its embedder's one linear
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_tiny_gemma4_gguf(path: str | Path, hf_dir: str | Path) -> Path:
    """The text model of the Gemma 4 checkpoint in `hf_dir` as a GGUF: write_tiny_gguf's `gemma4` file of the
    Gemma4ForCausalLM it holds."""
    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        text = Path(scratch)
        causal = config["text_config"] | {"architectures": ["Gemma4ForCausalLM"]}
        (text / "config.json").write_text(json.dumps(causal))
        tensors = load_file(hf_dir / "model.safetensors")
        save_file({"model." + name.removeprefix(TEXT_PREFIX): values for name, values in tensors.items()
                   if name.startswith(TEXT_PREFIX)}, text / "model.safetensors")  # fmt: skip
        for name in TOKENIZER_FILES:
            shutil.copy(hf_dir / name, text / name)
        write_tiny_gguf(path, text)
    return path


def write_tiny_gemma4_mmproj(path: str | Path, hf_dir: str | Path) -> Path:
    """The tower and embedder of the Gemma 4 checkpoint in `hf_dir` as llama.cpp's `convert_hf_to_gguf.py --mmproj
    --outtype f32` writes them (its Gemma4VisionAudioModel, without an audio tower): general.type "mmproj", the
    `clip.vision.*` sizes (image_size 224, a dummy), the preprocessor's mean and std, projector "gemma4v", epsilon
    1e-6 (the converter reads a layer_norm_eps Gemma 4's config lacks); gguf-py's `v.*` names, the patch embedding as
    a conv2d's [D, 3, p, p], scalars as 1-element tensors, the embedder as `mm.input_projection`."""
    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    vision, images = config["vision_config"], json.loads((hf_dir / "preprocessor_config.json").read_text())
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(hf_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(config["text_config"]["hidden_size"])
    writer.add_vision_image_size(224)
    writer.add_vision_patch_size(vision["patch_size"])
    writer.add_vision_embedding_length(vision["hidden_size"])
    writer.add_vision_feed_forward_length(vision["intermediate_size"])
    writer.add_vision_block_count(vision["num_hidden_layers"])
    writer.add_vision_head_count(vision["num_attention_heads"])
    writer.add_vision_image_mean(images["image_mean"])
    writer.add_vision_image_std(images["image_std"])
    writer.add_clip_vision_projector_type(gguf.VisionProjectorType.GEMMA4V)
    writer.add_vision_attention_layernorm_eps(1e-6)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision["num_hidden_layers"])
    for name, values in load_file(hf_dir / "model.safetensors").items():
        if name == EMBEDDER:
            writer.add_tensor("mm.input_projection.weight", values.astype(np.float32))
            continue
        if not name.startswith(TOWER_PREFIX):
            continue
        values = values.astype(np.float32).reshape(values.shape or (1,))  # scalars as 1-element tensors
        name = name.replace(TOWER_PREFIX + "encoder.", "vision_model.model.").replace(".linear.weight", ".weight")
        if name.endswith("position_embedding_table"):
            name += ".weight"
        if name.endswith("patch_embedder.input_proj.weight"):  # a linear over (row, column, channel): [D, 3, p, p]
            p = vision["patch_size"]
            values = np.ascontiguousarray(values.reshape(len(values), p, p, 3).transpose(0, 3, 1, 2))
        base, _, kind = name.rpartition(".")
        if kind not in ("weight", *CLIP_BOUNDS):  # std_bias, std_scale: named whole
            base, kind = name, ""
        gguf_name = names.get_name(base)
        writer.add_tensor(f"{gguf_name}.{kind}" if kind else gguf_name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
