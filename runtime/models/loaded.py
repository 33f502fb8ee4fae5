"""What every model format's loader returns (`LoadedModel`), and the one error they raise (`ModelLoadError`).

The format loaders (`gguf_loader`, `hf_loader`) and `loader.load_model`, which picks between them, all build on this
module, which imports none of them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.config import ModelConfig

if TYPE_CHECKING:  # annotations only: the model cache and the executors import this module without loading torch
    import torch
    from transformers import PreTrainedTokenizerBase

    from sagellm.backends.quantized import QuantizedWeight


class ModelLoadError(InvalidInput):
    """A model could not be loaded; the message names the file and the problem in one line (the CLI's exit 2)."""


def read_json(path: Path, max_bytes: int | None = None) -> dict[str, Any]:
    """A model file's JSON object (config.json, generation_config.json): a bad one is an error naming it. `max_bytes`
    bounds a file a request names (a LoRA adapter's config): one larger is refused before it is parsed. Nesting
    deeper than the parser recurses is refused too, never a crash of whoever asked."""
    try:
        with path.open("rb") as file:
            data = file.read() if max_bytes is None else file.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise ModelLoadError(f"{path}: over {max_bytes} bytes, larger than any such file is")
        value = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable JSON: {describe(e)}") from e
    except RecursionError:
        raise ModelLoadError(f"{path}: its arrays or objects nest too deeply to be a model's JSON") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return value


def describe(error: BaseException) -> str:
    """A third-party exception as one line, for the tail of a ModelLoadError message."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


class WeightsOnRead(Mapping[str, "torch.Tensor"]):
    """A model's weights by name, some made only when read: a GGUF weight kept as its blocks is dequantized if a
    backend asks for its floats, and a backend reading the blocks never does, so a Q4_K_M file is not expanded to
    float32 in memory. A weight made once is kept (a tied embedding is read twice) until the mapping is dropped."""

    def __init__(self, ready: dict[str, torch.Tensor], on_read: dict[str, tuple[tuple[int, ...], Callable]]) -> None:
        self._ready = ready
        self._on_read = on_read  # name -> (shape, () -> the tensor)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._ready:
            self._ready[name] = self._on_read[name][1]()
        return self._ready[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._ready
        yield from (name for name in self._on_read if name not in self._ready)

    def __len__(self) -> int:
        return len(self._ready.keys() | self._on_read.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._ready or name in self._on_read

    def with_ready(self, weights: Mapping[str, torch.Tensor]) -> WeightsOnRead:
        """These weights and `weights` beside them (a GGUF model's and its mmproj's)."""
        return WeightsOnRead({**self._ready, **weights}, self._on_read)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight's shape, none made for it."""
        on_read = {name: shape for name, (shape, _) in self._on_read.items()}
        return on_read | {name: tuple(t.shape) for name, t in self._ready.items()}


@dataclass(frozen=True)
class ProcessorFiles:
    """A model's preprocessing settings as transformers' processors read them: a Hugging Face directory's
    preprocessor_config.json and processor_config.json, or what a GGUF model's mmproj file implies (mmproj/reader.py),
    so the prompts' side of images never knows which format it serves."""

    origin: Path  # where they were read from (a directory, or an mmproj file), for errors
    preprocessor: Mapping[str, Any] = field(default_factory=dict)  # preprocessor_config.json's
    processor: Mapping[str, Any] = field(default_factory=dict)  # processor_config.json's

    @classmethod
    def read(cls, directory: Path) -> ProcessorFiles:
        """A Hugging Face directory's (either file may be absent: empty)."""
        files = [directory / name for name in ("preprocessor_config.json", "processor_config.json")]
        return cls(directory, *(read_json(f) if f.is_file() else {} for f in files))


@dataclass
class LoadedModel:
    config: ModelConfig
    # Canonical Hugging Face names (model.layers.{i}.self_attn.q_proj.weight, ...); lm_head.weight only when untied.
    # Empty when loaded with load_weights=False.
    weights: Mapping[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerBase | None
    chat_template: str | None
    source: Path  # the directory or the .gguf file the weights were read from
    name: str
    # The 2-D weights a GGUF file stored in a kind some backend's kernels read (KEPT_KINDS), as stored, under the
    # same names; `weights` gives each of them dequantized too, when read (WeightsOnRead).
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    # The model's own sampling defaults (its generation config; `sampling_defaults`), under SamplingParams' names.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    # The mapped GGUF file `quantized` views (an mmap.mmap), so its pages can leave this process's resident memory
    # once the weights are packed (common/memory.py `drop_mapped_pages`); None for other formats.
    mapped: Any = None
    # A model that takes images or audio: its processor's settings (a Hugging Face directory's files, or those an
    # mmproj file's metadata implies); None for a text model.
    processor_files: ProcessorFiles | None = None
