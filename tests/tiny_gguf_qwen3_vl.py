"""A Qwen3-VL checkpoint (tests/tiny_qwen_vl_models.make_tiny_qwen3_vl) as llama.cpp's convert_hf_to_gguf.py writes it:
its text model as a `qwen3vl` GGUF (Qwen3VLTextModel: Qwen3's keys and tensors under that architecture, with the
multimodal rope's sections and the DeepStack layers' count; `write_tiny_qwen3_vl_gguf`) and its tower and mergers as
the `--mmproj` file (Qwen3VLVisionModel: Qwen3.5's file with DeepStack; `write_tiny_qwen3_vl_mmproj`). Each is the
family's nearest writer's file (write_tiny_gguf's `qwen3`, write_tiny_qwen3_5_mmproj's) copied with what differs.

Both were checked by hand against the converter's own files for make_tiny_qwen3_vl with deepstack_visual_indexes
[0, 2] (`--outtype f32`, the tiny tokenizer's pre-tokenizer taken as "gpt-2"): the mmproj has the same keys, values,
tensor names, types, shapes and values (but general.name and general.size_label); the text GGUF the same `qwen3vl.*`
keys (and our rope.dimension_count and vocab_size) and tensors. tests/multimodal/test_qwen3_vl_gguf.py checks it
again where the converter is on the machine."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file, save_file

from tests.tiny_gguf_qwen import TEXT_PREFIX, TOKENIZER_FILES, TOWER_PREFIX, write_tiny_qwen3_5_mmproj
from tests.tiny_models import write_tiny_gguf

DEEPSTACK_PREFIX = TOWER_PREFIX + "deepstack_merger_list."  # the checkpoint's DeepStack mergers, by their place
DEEPSTACK_PARTS = {"norm": "norm", "linear_fc1": "fc1", "linear_fc2": "fc2"}  # and gguf-py's v.deepstack.{layer}.*


def write_tiny_qwen3_vl_gguf(path: str | Path, hf_dir: str | Path) -> Path:
    """The text model of the Qwen3-VL checkpoint in `hf_dir` as a GGUF: write_tiny_gguf's `qwen3` file of the
    Qwen3ForCausalLM it holds, as `qwen3vl` with `rope.dimension_sections` the checkpoint's mrope_section and a 0
    and `n_deepstack_layers` its tower's DeepStack layers' count."""
    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    text_config = config["text_config"]
    rope = text_config["rope_parameters"]
    with tempfile.TemporaryDirectory() as scratch:  # the text model alone, as a Qwen3ForCausalLM checkpoint
        text = Path(scratch)
        plain_rope = {k: v for k, v in rope.items() if not k.startswith("mrope")}
        causal = text_config | {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "rope_parameters": plain_rope,
        }
        (text / "config.json").write_text(json.dumps(causal))
        tensors = load_file(hf_dir / "model.safetensors")
        save_file({"model." + name.removeprefix(TEXT_PREFIX): values for name, values in tensors.items()
                   if name.startswith(TEXT_PREFIX)} | {"lm_head.weight": tensors["lm_head.weight"]},
                  text / "model.safetensors")  # fmt: skip
        for name in TOKENIZER_FILES:
            shutil.copy(hf_dir / name, text / name)
        qwen3 = write_tiny_gguf(text / "qwen3.gguf", text)

        def qwen3vl_keys(writer: gguf.GGUFWriter) -> None:
            writer.add_name(hf_dir.name)
            writer.add_rope_dimension_sections([*rope["mrope_section"], 0])
            writer.add_num_deepstack_layers(len(config["vision_config"]["deepstack_visual_indexes"]))

        return copy_gguf(qwen3, path, "qwen3vl", qwen3vl_keys)


def write_tiny_qwen3_vl_mmproj(path: str | Path, hf_dir: str | Path) -> Path:
    """The tower and mergers of the Qwen3-VL checkpoint in `hf_dir` as llama.cpp's `convert_hf_to_gguf.py --mmproj
    --outtype f32` writes them: write_tiny_qwen3_5_mmproj's file of its tower and main merger (Qwen3-VL's are
    Qwen3.5's), with `clip.vision.is_deepstack_layers` flagging deepstack_visual_indexes' layers and the merger of
    the j-th of them (deepstack_merger_list.{j}) as `v.deepstack.{its layer}.norm`, `.fc1` and `.fc2`."""
    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    layers = config["vision_config"]["deepstack_visual_indexes"]
    tensors = load_file(hf_dir / "model.safetensors")
    deepstack = {}
    for name, values in tensors.items():
        if name.startswith(DEEPSTACK_PREFIX):  # ...deepstack_merger_list.{j}.{part}.{kind}
            j, part, kind = name.removeprefix(DEEPSTACK_PREFIX).split(".")
            deepstack[f"v.deepstack.{layers[int(j)]}.{DEEPSTACK_PARTS[part]}.{kind}"] = values.astype(np.float32)
    with tempfile.TemporaryDirectory() as scratch:  # the checkpoint without its DeepStack mergers
        tower = Path(scratch)
        for name in ("config.json", "preprocessor_config.json"):
            shutil.copy(hf_dir / name, tower / name)
        save_file({n: v for n, v in tensors.items() if not n.startswith(DEEPSTACK_PREFIX)}, tower / "model.safetensors")
        qwen3_5 = write_tiny_qwen3_5_mmproj(tower / "mmproj.gguf", tower)

        def deepstack_keys(writer: gguf.GGUFWriter) -> None:
            writer.add_name(hf_dir.name)
            writer.add_vision_is_deepstack_layers([i in layers for i in range(config["vision_config"]["depth"])])

        return copy_gguf(qwen3_5, path, "clip", deepstack_keys, deepstack)


def copy_gguf(
    source: Path,
    path: Path,
    arch: str,
    add_keys: Callable[[gguf.GGUFWriter], None],
    tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """`source` (an F32 file) copied to `path` as architecture `arch` (its keys under the source's architecture moved
    under `arch`): the keys `add_keys` writes first (replacing the source's of the same name), then the source's,
    then its tensors and `tensors`."""
    reader = gguf.GGUFReader(source)
    before = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(path, arch)
    add_keys(writer)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        name = arch + name.removeprefix(before) if name.startswith(before + ".") else name
        if name not in writer.kv_data[0]:
            sub_type = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type)
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor.name
        writer.add_tensor(tensor.name, np.array(tensor.data))
    for name, values in (tensors or {}).items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
