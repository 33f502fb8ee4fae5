"""A checkpoint's preprocessing settings as transformers' processors read them: its preprocessor_config.json and
processor_config.json. A Hugging Face directory holds them; for a GGUF model with an mmproj file they are made
from that file's metadata (gguf_mmproj.py), so the prompts' side of images never knows which format it serves."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm.runtime.models.loaded import ModelLoadError


@dataclass(frozen=True)
class ProcessorFiles:
    origin: Path  # where they were read from (a directory, or an mmproj file), for errors
    preprocessor: Mapping[str, Any] = field(default_factory=dict)  # preprocessor_config.json's
    processor: Mapping[str, Any] = field(default_factory=dict)  # processor_config.json's

    @classmethod
    def read(cls, directory: Path) -> ProcessorFiles:
        """A Hugging Face directory's (either file may be absent: empty)."""
        files = (_read_json(directory / name) for name in ("preprocessor_config.json", "processor_config.json"))
        return cls(directory, *files)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
