"""`load_model`: the one entry point that turns a path on disk into weights, a ModelConfig and a tokenizer.

It only decides which format a path holds (a Hugging Face directory with config.json + safetensors, or a GGUF file)
and hands it to that format's loader; every loader returns the same `LoadedModel`, with weights under the canonical
Hugging Face names, so nothing downstream ever knows which format a model came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sagellm.common.progress import stage
from sagellm.runtime.models import sampling_defaults
from sagellm.runtime.models.gguf_loader import load_gguf
from sagellm.runtime.models.hf_loader import load_hf_dir
from sagellm.runtime.models.loaded import LoadedModel, ModelLoadError
from sagellm.runtime.models.mmproj.reader import with_mmproj

GGUF_MAGIC = b"GGUF"


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    load_tokenizer: bool = True,
    load_weights: bool = True,
    mtp_head: bool = False,
    encoders_only: bool = False,
    mmproj: str | Path | None = None,
    language_model_only: bool = False,
) -> LoadedModel:
    """Load the model at `path`: a Hugging Face directory, a .gguf file, or a directory holding exactly one .gguf.

    `load_weights=False` reads only the config (and tokenizer), leaving `weights` empty: for inspecting a model.
    `mtp_head`: the multi-token prediction head's weights too (mtp_head.py; Hugging Face checkpoints only).
    `encoders_only`: the media encoders' weights alone (an `encode` node's). `mmproj`: a GGUF model's vision
    encoder, llama.cpp's multimodal projector file (mmproj/reader.py). `language_model_only`: a multimodal
    checkpoint's text model alone, as a text model's (its encoders' weights not read; EngineConfig's)."""
    source = Path(path).expanduser()
    options: dict[str, Any] = {"dtype": dtype, "load_tokenizer": load_tokenizer, "load_weights": load_weights}
    hf_dir = (source / "config.json").is_file()
    if mmproj is not None and hf_dir:
        raise ModelLoadError(f"{source}: an mmproj file goes with a GGUF model; a Hugging Face checkpoint holds its "
                             "vision encoder")  # fmt: skip
    if language_model_only and (encoders_only or mmproj is not None):
        raise ModelLoadError(f"{source}: language_model_only serves the text model alone: no mmproj, no encoder")
    if encoders_only and not hf_dir and mmproj is None:
        raise ModelLoadError(f"{source}: a media encoder is read from a Hugging Face checkpoint's directory or a "
                             "GGUF model's mmproj file")  # fmt: skip
    with stage(f"loading {source.name}" if load_weights else f"reading {source.name}'s config and tokenizer"):
        if mmproj is not None:
            return _load_with_mmproj(source, Path(mmproj).expanduser(), encoders_only, options)
        if encoders_only:
            options["encoders_only"] = True
        if language_model_only and hf_dir:  # (a GGUF's encoder is in an mmproj file, not given)
            options["language_model_only"] = True
        return _load(source, mtp_head=mtp_head, **options)


def _load_with_mmproj(source: Path, mmproj: Path, encoders_only: bool, options: dict[str, Any]) -> LoadedModel:
    """A GGUF model with its vision encoder read from `mmproj`; `encoders_only`: the text model's config and
    tokenizer, the encoder's weights alone."""
    load_weights = options["load_weights"]
    loaded = _load(source, mtp_head=False, **(options | {"load_weights": load_weights and not encoders_only}))
    return with_mmproj(loaded, mmproj, options["dtype"], load_weights)


def _load(source: Path, mtp_head: bool, **options: Any) -> LoadedModel:
    if not source.exists():
        raise ModelLoadError(f"{source}: no such file or directory")
    if mtp_head and not (source / "config.json").is_file():
        raise ModelLoadError(f"{source}: the multi-token prediction head is read from Hugging Face checkpoints only "
                             "(a GGUF's nextn layers are not read)")  # fmt: skip
    if source.is_file():
        if not _is_gguf(source):
            raise ModelLoadError(
                f"{source}: not a GGUF file; pass a .gguf file or a model directory with config.json + *.safetensors"
            )
        return _load_gguf(source, source.stem, options)
    if (source / "config.json").is_file():
        return load_hf_dir(source, mtp_head=mtp_head, **options)
    ggufs = sorted(source.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0], source.name, options)
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(f"{source}: holds several .gguf files ({names}); pass one of them")
    raise ModelLoadError(f"{source}: not a model directory (no config.json and no .gguf file)")


def _load_gguf(path: Path, name: str, options: dict[str, Any]) -> LoadedModel:
    """A GGUF file, with the sampling a generation_config.json beside it recommends over its own metadata's."""
    loaded = load_gguf(path, name=name, **options)
    loaded.sampling_defaults = {**loaded.sampling_defaults, **sampling_defaults.beside(path)}
    return loaded


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
