"""A Qwen3.5 checkpoint with its vision tower (tests/tiny_qwen_vl_models.make_tiny_qwen3_5_vision) as llama.cpp's
convert_hf_to_gguf.py writes it: its text model as a `qwen35` GGUF with the checkpoint's multimodal rope sections
(`write_tiny_qwen3_5_gguf`) and its tower and merger as the `--mmproj` file (`write_tiny_qwen3_5_mmproj`).

Both were checked by hand against that converter's own files for make_tiny_qwen3_5_vision (`--outtype f32`, the text
model with `--no-mtp` and its tiny tokenizer's pre-tokenizer taken as "gpt-2"): the mmproj has the same keys, values,
tensor names, types, shapes and values (but general.size_label, which names the parameter count); the text GGUF the
same `qwen35.*` keys (and our vocab_size) and tensors (ssm_a, -exp(A_log), to float32's last bit: write_tiny_gguf
takes numpy's exp, the converter torch's). tests/multimodal/test_qwen3_5_gguf.py checks it again where the converter
is on the machine."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file, save_file

from tests.tiny_models import write_tiny_gguf

TEXT_PREFIX = "model.language_model."  # Qwen3_5ForConditionalGeneration's text model's tensors
TOWER_PREFIX = "model.visual."  # its tower's and merger's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_tiny_qwen3_5_gguf(path: str | Path, hf_dir: str | Path) -> Path:
    """The text model of the Qwen3.5 checkpoint in `hf_dir` as a GGUF: tests/tiny_models.write_tiny_gguf's `qwen35`
    file of it (saved as the Qwen3_5ForCausalLM it holds), with `rope.dimension_sections` the checkpoint's
    mrope_section and a 0 (write_tiny_gguf writes the converter's default [11, 11, 10, 0], for a checkpoint without
    them), set in place."""
    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:  # the text model alone, as a Qwen3_5ForCausalLM checkpoint
        text = Path(scratch)
        causal = config["text_config"] | {"architectures": ["Qwen3_5ForCausalLM"]}
        (text / "config.json").write_text(json.dumps(causal))
        tensors = load_file(hf_dir / "model.safetensors")
        save_file({"model." + name.removeprefix(TEXT_PREFIX): values for name, values in tensors.items()
                   if name.startswith(TEXT_PREFIX)} | {"lm_head.weight": tensors["lm_head.weight"]},
                  text / "model.safetensors")  # fmt: skip
        for name in TOKENIZER_FILES:
            shutil.copy(hf_dir / name, text / name)
        write_tiny_gguf(path, text)
    reader = gguf.GGUFReader(path, "r+")  # the file's own memory: what is set here is written
    field = reader.fields["qwen35.rope.dimension_sections"]
    for i, count in enumerate([*config["text_config"]["rope_parameters"]["mrope_section"], 0]):
        field.parts[field.data[i]][0] = count
    reader.data.flush()
    return path


def write_tiny_qwen3_5_mmproj(path: str | Path, hf_dir: str | Path) -> Path:
    """The tower and merger of the Qwen3.5 checkpoint in `hf_dir` as llama.cpp's `convert_hf_to_gguf.py --mmproj
    --outtype f32` writes them (its Qwen3VLVisionModel): general.type "mmproj", the `clip.vision.*` sizes (image_size
    the learned positions' side in pixels), the preprocessor's mean and std, projector "qwen3vl_merger", the GELU,
    the merge size, the text model's rms_norm_eps as the LayerNorms', no deepstack layers; gguf-py's `v.*` names, the
    Conv3d patch embedding as two conv2d weights (`v.patch_embd.weight` and `.weight.1`, one per frame), the merger's
    norm as `v.post_ln` and its linears as `mm.0` and `mm.2`."""
    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    vision, images = config["vision_config"], json.loads((hf_dir / "preprocessor_config.json").read_text())
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(hf_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(config["text_config"]["hidden_size"])
    writer.add_vision_image_size(int(vision["num_position_embeddings"] ** 0.5 * vision["patch_size"]))
    writer.add_vision_patch_size(vision["patch_size"])
    writer.add_vision_embedding_length(vision["hidden_size"])
    writer.add_vision_feed_forward_length(vision["intermediate_size"])
    writer.add_vision_block_count(vision["depth"])
    writer.add_vision_head_count(vision["num_heads"])
    writer.add_vision_image_mean(images["image_mean"])
    writer.add_vision_image_std(images["image_std"])
    writer.add_clip_projector_type(gguf.VisionProjectorType.QWEN3VL)
    writer.add_vision_use_gelu(True)
    writer.add_vision_spatial_merge_size(vision["spatial_merge_size"])
    writer.add_vision_attention_layernorm_eps(config["text_config"]["rms_norm_eps"])
    writer.add_vision_is_deepstack_layers([False] * vision["depth"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision["depth"])
    merger = {"merger.norm": "v.post_ln", "merger.linear_fc1": "mm.0", "merger.linear_fc2": "mm.2"}
    for name, values in load_file(hf_dir / "model.safetensors").items():
        if not name.startswith(TOWER_PREFIX):
            continue
        base, _, kind = name.removeprefix(TOWER_PREFIX).rpartition(".")
        if base == "patch_embed.proj" and kind == "weight":  # [D, C, 2, p, p]: a conv2d weight per frame
            writer.add_tensor("v.patch_embd.weight", np.ascontiguousarray(values[:, :, 0]))
            writer.add_tensor("v.patch_embd.weight.1", np.ascontiguousarray(values[:, :, 1]))
            continue
        gguf_base = merger.get(base) or names.get_name("visual." + base)
        writer.add_tensor(f"{gguf_base}.{kind}", values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
