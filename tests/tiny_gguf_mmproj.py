"""The tiny LLaVA, Idefics3 / SmolVLM and Qwen2.5-VL checkpoints (tests/tiny_vision_models) as llama.cpp writes them:
each text model as a GGUF (`write_tiny_text_gguf`: write_tiny_gguf's file of it, Qwen2.5-VL's as the `qwen2vl`
architecture with its multimodal rope sections) and each tower and projector as the mmproj file its converter writes
(`write_tiny_llava_mmproj`, `write_tiny_idefics3_mmproj`, `write_tiny_qwen2_5_vl_mmproj`).

Each mmproj writer was checked by hand against llama.cpp's own file for its tiny checkpoint (LLaVA's from the legacy
tools/mtmd/legacy-models converter with `--clip-model-is-vision --use-f32`, run on llava_surgery_v2.py's tower and
projector; the others from convert_hf_to_gguf.py --mmproj --outtype f32): the same keys, values, tensor names,
types, shapes and values (but general.size_label, the parameter count's label, and general.name); each text GGUF
the same `llama.*` (`qwen2vl.*`) keys, token types and tensors (Idefics3's from its checkpoint with
text_config.architectures VLlama3ForCausalLM, as hub SmolVLM configs have it: the converter takes no other).
tests/multimodal/test_mmproj_families.py checks them again where the converter is on the machine
(tests/llama_cpp_converter.py)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file, save_file

from tests.tiny_models import write_tiny_gguf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# Each family's text model's tensors in its checkpoint (the prefix its body's and its head's names have), and the
# causal LM class it is saved as
_TEXT = {
    "llava": ("language_model.model.", "language_model.lm_head.", "LlamaForCausalLM"),
    "idefics3": ("model.text_model.", "lm_head.", "LlamaForCausalLM"),
    "smolvlm": ("model.text_model.", "lm_head.", "LlamaForCausalLM"),
    "qwen2_5_vl": ("model.", "lm_head.", "Qwen2ForCausalLM"),
}
# write_tiny_gguf's keys that llama.cpp's converter does not write for a `qwen2vl` text model
QWEN2VL_UNWRITTEN = ("attention.key_length", "attention.value_length", "rope.dimension_count", "vocab_size")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # the legacy default


def write_tiny_text_gguf(path: str | Path, hf_dir: str | Path) -> Path:
    """The text model of the checkpoint in `hf_dir` as a GGUF: write_tiny_gguf's file of it (saved as the causal LM
    it holds), written again with its added tokens that are not special typed USER_DEFINED (Idefics3's tile tags),
    as llama.cpp's converter types them; Qwen2.5-VL's as the converter writes it: architecture `qwen2vl`, its keys so
    prefixed, `rope.dimension_sections` the checkpoint's mrope_section and a 0, without the keys it does not write
    for it."""
    from transformers import AutoTokenizer

    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    body, head, causal_class = _TEXT[config["model_type"]]
    with tempfile.TemporaryDirectory() as scratch:  # the text model alone, as a causal LM checkpoint
        text = Path(scratch)
        settings = config["text_config"] | {"architectures": [causal_class]}
        settings["model_type"] = {"Qwen2ForCausalLM": "qwen2"}.get(causal_class, settings["model_type"])
        (text / "config.json").write_text(json.dumps(settings))
        tensors = load_file(hf_dir / "model.safetensors")
        causal = {"lm_head." + name.removeprefix(head): values for name, values in tensors.items()
                  if name.startswith(head)}  # fmt: skip
        causal |= {"model." + name.removeprefix(body): values for name, values in tensors.items()
                   if name.startswith(body) and not name.startswith("model.visual.")}  # fmt: skip
        save_file(causal, text / "model.safetensors")
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copy(hf_dir / name, text / name)
        written = write_tiny_gguf(text / "text.gguf", text)
        added = {i for i, token in AutoTokenizer.from_pretrained(hf_dir).added_tokens_decoder.items()
                 if not token.special}  # fmt: skip
        if config["model_type"] != "qwen2_5_vl":
            return _rewritten(path, written, "llama", added)
        sections = [*config["text_config"]["rope_parameters"]["mrope_section"], 0]
        return _rewritten(path, written, "qwen2vl", added, sections)


def _rewritten(path: Path, written: Path, arch: str, user_defined: set[int], sections: list[int] | None = None) -> Path:
    """The GGUF at `written` written again at `path` as architecture `arch` (its keys so prefixed), the tokens of
    `user_defined` typed so, with M-RoPE's `sections` where given (and without the keys the converter writes for no
    `qwen2vl` model: QWEN2VL_UNWRITTEN)."""
    dropped = {f"qwen2.{key}" for key in QWEN2VL_UNWRITTEN} if sections is not None else set()
    reader = gguf.GGUFReader(written)
    before = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(path, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in dropped:
            continue
        kind, value = field.types[0], field.contents()
        if name == "tokenizer.ggml.token_type":
            value = [gguf.TokenType.USER_DEFINED if i in user_defined else t for i, t in enumerate(value)]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name.replace(f"{before}.", f"{arch}.", 1), value, kind, sub_type=sub)
    if sections is not None:
        writer.add_rope_dimension_sections(sections)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_shape=tuple(reversed(tensor.shape.tolist())),
                          raw_dtype=tensor.tensor_type)  # fmt: skip
    return _written(writer, path)


def write_tiny_llava_mmproj(path: str | Path, hf_dir: str | Path, feature_layers: bool = False) -> Path:
    """The CLIP tower and projector of the LLaVA checkpoint in `hf_dir` as llama.cpp's legacy converter writes them
    (convert_image_encoder_to_gguf.py --clip-model-is-vision --llava-projector --use-f32, on the tower alone with its
    config.json): no general.type, the `clip.has_*` flags, projector "mlp", the tower's sizes and its own
    projection_dim, one layer fewer than it has (the last is dropped, and not written), CLIP's default mean and std
    (it reads no processor), clip.use_gelu for a "gelu" tower; `v.*` names of its own (fc1 as `ffn_down`, fc2 as
    `ffn_up`), no post-norm, the patch embedding and the projector's linears in F16. With `feature_layers`, as it
    writes them where the tower's config.json carries the checkpoint's vision_feature_layer (granite-vision's way):
    `clip.vision.feature_layer` (from the front) and the layers up to the last of them."""
    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    vision, layers = config["vision_config"], config["vision_config"]["num_hidden_layers"]
    chosen = (
        config["vision_feature_layer"]
        if isinstance(config["vision_feature_layer"], list)
        else [config["vision_feature_layer"]]
    )
    chosen = [i + layers + 1 if i < 0 else i for i in chosen] if feature_layers else None
    kept = max(chosen) if chosen else layers - 1
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_file_type(0)
    writer.add_name("vit")  # the tower's directory, as the converter's documentation names it
    writer.add_description("image encoder for LLaVA")
    writer.add_string("clip.projector_type", "mlp")
    for key in ("image_size", "patch_size"):
        writer.add_uint32(f"clip.vision.{key}", vision[key])
    writer.add_uint32("clip.vision.embedding_length", vision["hidden_size"])
    writer.add_uint32("clip.vision.feed_forward_length", vision["intermediate_size"])
    writer.add_uint32("clip.vision.projection_dim", vision["projection_dim"])
    writer.add_uint32("clip.vision.attention.head_count", vision["num_attention_heads"])
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", vision["layer_norm_eps"])
    writer.add_uint32("clip.vision.block_count", kept)
    if chosen:
        writer.add_array("clip.vision.feature_layer", chosen)
    writer.add_array("clip.vision.image_mean", CLIP_MEAN)
    writer.add_array("clip.vision.image_std", CLIP_STD)
    writer.add_bool("clip.use_gelu", vision["hidden_act"] == "gelu")
    tensors = load_file(hf_dir / "model.safetensors")
    for name in ("linear_1", "linear_2"):
        for kind in ("weight", "bias"):
            values = tensors[f"multi_modal_projector.{name}.{kind}"].astype(np.float32)
            gguf_name = f"mm.{0 if name == 'linear_1' else 2}.{kind}"
            writer.add_tensor(gguf_name, values.astype(np.float16) if values.ndim == 2 else values)
    for name, values in tensors.items():
        layer = name.removeprefix("vision_tower.encoder.layers.").partition(".")[0]
        dropped = name.startswith("vision_tower.post_layernorm.") or (layer.isdigit() and int(layer) >= kept)
        if name.startswith("vision_tower.") and not dropped:
            values = values.astype(np.float16 if values.ndim == 4 else np.float32)
            writer.add_tensor(_legacy_name(name.removeprefix("vision_tower.")), values)
    return _written(writer, path)


def _legacy_name(name: str) -> str:
    """The legacy converter's name of a CLIP tower tensor (its get_tensor_name on `vision_model.<name>`)."""
    name = "v." + name
    for old, new in (("encoder.layers", "blk"), ("embeddings.", ""), ("_proj", ""), ("self_attn.", "attn_"),
                     ("layer_norm", "ln"), ("mlp.fc1", "ffn_down"), ("mlp.fc2", "ffn_up"), ("embedding", "embd"),
                     ("layrnorm", "ln")):  # fmt: skip
        name = name.replace(old, new)
    return name


def write_tiny_idefics3_mmproj(path: str | Path, hf_dir: str | Path) -> Path:
    """The tower and connector of the Idefics3 (or SmolVLM) checkpoint in `hf_dir` as llama.cpp's
    `convert_hf_to_gguf.py --mmproj --outtype f32` writes them (its SmolVLMModel): general.type "mmproj", the
    `clip.vision.*` sizes (image_size the tile's side), the preprocessor's mean and std, projector "idefics3" with the
    pixel shuffle's square as `projector.scale_factor`, the GELU, the processor's longest edge as
    `preproc_image_size`; gguf-py's `v.*` names and the connector's linear as `mm.model.fc`."""
    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    vision, images = config["vision_config"], json.loads((hf_dir / "preprocessor_config.json").read_text())
    writer = _mmproj_writer(path, hf_dir, config["text_config"]["hidden_size"], vision, images)
    writer.add_vision_block_count(vision["num_hidden_layers"])
    writer.add_vision_head_count(vision["num_attention_heads"])
    writer.add_vision_image_mean(images["image_mean"])
    writer.add_vision_image_std(images["image_std"])
    writer.add_clip_projector_type(gguf.VisionProjectorType.IDEFICS3)
    writer.add_vision_attention_layernorm_eps(vision.get("layer_norm_eps", 1e-5))
    writer.add_vision_projector_scale_factor(config.get("scale_factor", 2))
    writer.add_vision_use_gelu(True)
    writer.add_vision_preproc_image_size(images.get("size", {}).get("longest_edge", vision["image_size"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision["num_hidden_layers"])
    for name, values in load_file(hf_dir / "model.safetensors").items():
        if name.startswith(("model.vision_model.", "model.connector.")):
            base, _, kind = name.rpartition(".")
            writer.add_tensor(f"{names.get_name(base)}.{kind}", values.astype(np.float32))
    return _written(writer, path)


def _mmproj_writer(path: Path, hf_dir: Path, text_width: int, vision: dict, images: dict) -> gguf.GGUFWriter:
    """A writer of convert_hf_to_gguf.py's mmproj keys every family shares, up to the tower's width."""
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(hf_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(text_width)
    writer.add_vision_image_size(vision.get("image_size", 560))  # the converter's for Qwen-VL, which has none
    writer.add_vision_patch_size(vision["patch_size"])
    writer.add_vision_embedding_length(vision["hidden_size"])
    writer.add_vision_feed_forward_length(vision["intermediate_size"])
    return writer


def _written(writer: gguf.GGUFWriter, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_qwen2_5_vl_mmproj(path: str | Path, hf_dir: str | Path) -> Path:
    """The tower and merger of the Qwen2.5-VL checkpoint in `hf_dir` as llama.cpp's `convert_hf_to_gguf.py --mmproj
    --outtype f32` writes them (its Qwen2VLVisionModel): general.type "mmproj", the `clip.vision.*` sizes (image_size
    its fixed 560), the preprocessor's mean and std, projector "qwen2.5vl_merger", the SiLU, the full attention
    layers as `n_wa_pattern` (the first's index + 1), the top level's rms_norm_eps (1e-6 where it has none) as the
    norms'; gguf-py's `v.*` names, each fused qkv as three linears (`attn_q`, `attn_k`, `attn_v`), the Conv3d patch
    embedding as two conv2d weights (`v.patch_embd.weight` and `.weight.1`), the merger's norm as `v.post_ln` and its
    linears as `mm.0` and `mm.2`."""
    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    vision, images = config["vision_config"], json.loads((hf_dir / "preprocessor_config.json").read_text())
    writer = _mmproj_writer(path, hf_dir, config["text_config"]["hidden_size"], vision, images)
    writer.add_vision_block_count(vision["depth"])
    writer.add_vision_head_count(vision["num_heads"])
    writer.add_vision_image_mean(images["image_mean"])
    writer.add_vision_image_std(images["image_std"])
    writer.add_clip_projector_type(gguf.VisionProjectorType.QWEN25VL)
    writer.add_vision_use_silu(True)
    writer.add_vision_n_wa_pattern(vision["fullatt_block_indexes"][0] + 1)
    writer.add_vision_attention_layernorm_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision["depth"])
    for name, values in load_file(hf_dir / "model.safetensors").items():
        if not name.startswith("visual."):
            continue
        base, _, kind = name.rpartition(".")
        values = values.astype(np.float32)
        if base == "visual.patch_embed.proj":  # [D, C, 2, p, p]: a conv2d weight per frame
            writer.add_tensor("v.patch_embd.weight", np.ascontiguousarray(values[:, :, 0]))
            writer.add_tensor("v.patch_embd.weight.1", np.ascontiguousarray(values[:, :, 1]))
        elif base.endswith(".attn.qkv"):  # q, k and v apart
            for third, part in zip(np.split(values, 3), "qkv"):
                writer.add_tensor(f"{names.get_name(base.replace('qkv', part))}.{kind}", third)
        else:
            writer.add_tensor(f"{names.get_name(base)}.{kind}", values)
    return _written(writer, path)
