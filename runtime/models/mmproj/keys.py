"""An mmproj file's metadata as each family's reader (mmproj/reader.py, mmproj/qwen.py) takes it: the
`clip.vision.*` keys its tower needs, the projection's width against the text model's, the image tokens by name in
the text model's vocabulary and the preprocessor's mean and std, each refused naming the file where it is missing
or wrong; and its tensors' gguf-py names under the graph's (`graph_name`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.loaded import ModelLoadError


def clip_key(path: Path, meta: dict[str, Any], name: str) -> Any:
    """The file's `clip.vision.<name>`, which its tower needs."""
    if (value := meta.get(f"clip.vision.{name}")) is None:
        raise ModelLoadError(f"{path}: lacks clip.vision.{name}")
    return value


def clip_float(path: Path, meta: dict[str, Any], name: str) -> float:
    """The file's `clip.vision.<name>`, a float32, as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06): the value the checkpoint's config held."""
    return float(str(np.float32(clip_key(path, meta, name))))


def check_projection(path: Path, meta: dict[str, Any], text: ModelConfig) -> None:
    """The projector gives the text model's width (the file's `projection_dim`, the text model's hidden size)."""
    if int(clip_key(path, meta, "projection_dim")) != text.hidden_size:
        raise ModelLoadError(f"{path}: projects to {meta['clip.vision.projection_dim']} features; the text model has "
                             f"{text.hidden_size}")  # fmt: skip


def token_ids(path: Path, tokenizer: Any, tokens: dict[str, str], family: str) -> dict[str, int]:
    """Each role's token (role -> its text) by its id in the text model's vocabulary, which must have it."""
    ids = {}
    for role, token in tokens.items():
        ids[role] = tokenizer.convert_tokens_to_ids(token) if tokenizer is not None else None
        if ids[role] is None or ids[role] == getattr(tokenizer, "unk_token_id", None):
            raise ModelLoadError(f"{path}: the text model's vocabulary has no {token}, which {family}'s images need")
    return ids


def image_statistics(path: Path, meta: dict[str, Any]) -> dict[str, list[float]]:
    """The preprocessor's image_mean and image_std, as the converter copies them into the file."""
    stats = {}
    for name in ("image_mean", "image_std"):
        if (values := meta.get(f"clip.vision.{name}")) is None or len(values) != 3:
            raise ModelLoadError(f"{path}: lacks clip.vision.{name} (three values)")
        stats[name] = [float(x) for x in values]
    return stats


def graph_name(
    name: str, whole: Mapping[str, str], layers: Mapping[str, str], layer: str, tower: str = "v"
) -> str | None:
    """gguf-py's tensor `name` under the graph's: a whole-tower tensor's as `whole` names it, a block's
    (`{tower}.blk.{i}.{part}.{weight|bias}`, its part in `layers`) as `layer.format(i)` + the part's name + its kind;
    None for one the family's files do not hold."""
    if name in whole:
        return whole[name]
    parts = name.split(".")
    if len(parts) == 5 and parts[:2] == [tower, "blk"] and parts[3] in layers:
        return f"{layer.format(parts[2])}{layers[parts[3]]}.{parts[4]}"
    return None
