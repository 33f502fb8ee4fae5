"""Qwen3-VL's vision encoder from llama.cpp's mmproj file: the VisionConfig and weights its Hugging Face checkpoint
gives (hf_vision_config._qwen3_vl), and which tower a "qwen3vl_merger" file holds: llama.cpp writes that projector
for Qwen3-VL's towers and Qwen3.5's alike (Qwen3VLVisionModel), so the text model beside it tells them apart (a
`qwen3vl` GGUF, read as our qwen3 row: Qwen3-VL's; a Qwen3.5: Qwen3.5's, mmproj/qwen.py).

Qwen3-VL's file is Qwen3.5's with DeepStack: `clip.vision.is_deepstack_layers` flags the tower layers whose outputs
pass a merger of their own, and each merger is stored under its layer's index in the tower (`v.deepstack.{layer}.`
`norm`, `fc1`, `fc2`), where the checkpoint numbers them by their place in deepstack_visual_indexes
(`deepstack_merger_list.{j}`). llama.cpp adds the flagged layers' rows to the text model's in the tower's order, as
transformers does for indexes listed in order (every hub checkpoint's), so the j-th flagged layer's merger is the
checkpoint's j-th. Pictures are resized and normalized as for Qwen3.5 (qwen3_5_preprocessor)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sagellm.runtime.models.architectures.vision_weights import TOWER
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.gguf_file import GGUFFile
from sagellm.runtime.models.loaded import ModelLoadError, ProcessorFiles
from sagellm.runtime.models.mmproj.qwen import (
    QWEN3_5_TEXT,
    qwen3_5_graph_weights,
    qwen3_5_preprocessor,
    qwen3_5_vision,
)
from sagellm.runtime.models.vision_config import VisionConfig

QWEN3_VL_TEXT = ("qwen3",)  # the text models a Qwen3-VL tower goes beside (a `qwen3vl` GGUF's row)
QWEN3VL_MERGER_TEXT = QWEN3_5_TEXT + QWEN3_VL_TEXT  # those a "qwen3vl_merger" file goes beside
DEEPSTACK_FLAGS = "clip.vision.is_deepstack_layers"  # a flag per tower layer
DEEPSTACK = "v.deepstack."  # v.deepstack.{layer}.{norm|fc1|fc2}.{weight|bias}
_MERGER = {"norm": "norm", "fc1": "linear_fc1", "fc2": "linear_fc2"}


def qwen3vl_merger_vision(
    path: Path, file: GGUFFile, text: ModelConfig, tokenizer: Any
) -> tuple[VisionConfig, ProcessorFiles]:
    """The tower beside `text` (Qwen3-VL's beside a qwen3 model, else Qwen3.5's) and the preprocessor both use."""
    if text.architecture in QWEN3_VL_TEXT:
        vision = qwen3_vl_vision(path, file, text, tokenizer)
    else:
        vision = qwen3_5_vision(path, file.metadata, text, tokenizer)
    return vision, ProcessorFiles(path, qwen3_5_preprocessor(path, file.metadata, vision))


def qwen3_vl_vision(path: Path, file: GGUFFile, text: ModelConfig, tokenizer: Any) -> VisionConfig:
    """Qwen3.5's tower as the file gives it, with the flagged layers as deepstack_layers, each of which the file must
    hold a merger for (and no other)."""
    meta = file.metadata
    flags = [bool(flag) for flag in meta.get(DEEPSTACK_FLAGS, ())]
    tower = qwen3_5_vision(path, {k: v for k, v in meta.items() if k != DEEPSTACK_FLAGS}, text, tokenizer)
    if flags and len(flags) != tower.num_layers:
        raise ModelLoadError(f"{path}: {DEEPSTACK_FLAGS} flags {len(flags)} layers; the tower has {tower.num_layers}")
    deepstack = tuple(layer for layer, flag in enumerate(flags) if flag)
    stored = _deepstack_layers(path, file.tensors)
    if stored != list(deepstack):
        raise ModelLoadError(f"{path}: {DEEPSTACK_FLAGS} flags tower layers {list(deepstack)}, but the file holds "
                             f"DeepStack mergers for layers {stored}")  # fmt: skip
    return replace(tower, deepstack_layers=deepstack)


def qwen3vl_merger_graph_weights(path: Path, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors under the graph's names: Qwen3.5's (qwen3_5_graph_weights), and each DeepStack merger as
    the checkpoint's deepstack_merger_list.{j}, j its layer's place among the file's merged layers."""
    layers = _deepstack_layers(path, stored)
    weights = qwen3_5_graph_weights(path, {n: v for n, v in stored.items() if not n.startswith(DEEPSTACK)})
    for name, values in stored.items():
        if name.startswith(DEEPSTACK):
            layer, part, kind = _deepstack_name(path, name)
            weights[f"{TOWER}deepstack_merger_list.{layers.index(layer)}.{_MERGER[part]}.{kind}"] = values
    return weights


def _deepstack_layers(path: Path, names: Any) -> list[int]:
    """The tower layers (in order) whose DeepStack mergers are among `names`."""
    return sorted({_deepstack_name(path, name)[0] for name in names if name.startswith(DEEPSTACK)})


def _deepstack_name(path: Path, name: str) -> tuple[int, str, str]:
    """(layer, part, weight or bias) of a DeepStack merger's tensor name."""
    parts = name.split(".")  # v.deepstack.{layer}.{part}.{kind}
    if len(parts) != 5 or not parts[2].isdigit() or parts[3] not in _MERGER or parts[4] not in ("weight", "bias"):
        raise ModelLoadError(f"{path}: tensor {name} is not one a Qwen3-VL mmproj holds")
    return int(parts[2]), parts[3], parts[4]
