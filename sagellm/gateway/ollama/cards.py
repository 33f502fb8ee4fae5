"""What Ollama's API says of the models: `/api/tags` (each model with its size, digest and details: format, family,
parameter size, quantization), `/api/show` (its template, parameters, model_info and the capabilities true to it),
`/api/ps` (those loaded now), and the names clients send: Ollama's `NAME:TAG`, where `:latest` is a model's own name.

A model whose files the gateway holds (the graph's own, a model on demand once loaded) is described from them: its
GGUF's file type, its config's shape and parameter count, its chat template; an embedding model as one; another
server's model by its name alone. The digest identifies the file as served (its path, size and modification time),
not its bytes: hashing a model of gigabytes per listing is not worth a client's cache key."""

from __future__ import annotations

import functools
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.replies.tools import takes_tools
from sagellm.gateway.serving.core import ServingCore
from sagellm.gateway.serving.instances import LATEST, untagged
from sagellm.runtime.parallel.model_shape import ModelShape
from sagellm.runtime.pipeline.served_model import ServedModel

FOREVER = "2318-08-23T00:00:00Z"  # a loaded model that is never unloaded expires here (Ollama's keep_alive -1 does)


class OllamaCards:
    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def served_name(self, name: str) -> str:
        """The served model a client's `NAME[:TAG]` names (`:latest` is the model's own name); 404 for others."""
        names = self.core.models()
        served = untagged(name, names)
        if served not in names:
            raise ApiError(404, f"model {name!r} not found", param="model", code="model_not_found")
        return served

    def listed(self, owner: str) -> list[dict[str, Any]]:
        """The models the caller's key (`owner`) may use."""
        return [self._card(name) for name in self.core.models() if self.core.tenants.ring.may_use(owner, name)]

    def running(self) -> list[dict[str, Any]]:
        """The models loaded now: the graph's own always, models on demand while loaded."""
        pool = self.core.readiness.models_on_demand
        names = self.core.models()
        loaded = [n for n in names if pool is None or n not in pool.models or pool.status(n)["value"] == "loaded"]
        return [{**self._card(name), "expires_at": FOREVER, "size_vram": 0, **self._context(name)} for name in loaded]

    def knows(self, name: str) -> bool:
        """Whether the gateway holds `name`'s files (its template, its config), so its capabilities are its own."""
        return self._files(name) is not None or self.core.embedder(name) is not None

    def capabilities(self, name: str) -> list[str]:
        """What `name` can do, as `/api/show` says (`_capabilities`); a pooling model (loaded or on demand) embeds."""
        if self.core.embedder(name) is not None or name in self.core.embedding_models():
            return ["embedding"]
        return _capabilities(self._files(name), self._template(name))

    def _template(self, name: str) -> str:
        served = self._files(name)
        template = getattr(served.tokenizer, "chat_template", None) if served is not None else None
        return template if isinstance(template, str) else ""

    def show(self, name: str) -> dict[str, Any]:
        card, served = self._card(name), self._files(name)
        parameters = "\n".join(f"{key} {value}" for key, value in ((served and served.sampling_defaults) or {}).items())
        source = served.path if served is not None else name
        modelfile = f"# Modelfile of {name}, as sageLLM serves it\nFROM {source}\n" + "".join(
            f"PARAMETER {line}\n" for line in parameters.splitlines()
        )
        return {
            "modelfile": modelfile,
            "parameters": parameters,
            "template": self._template(name),
            "details": card["details"],
            "model_info": self._model_info(name, served),
            "capabilities": self.capabilities(name),
            "modified_at": card["modified_at"],
        }

    # -------------------------------------------------------------------------------------------------- pieces
    def _files(self, name: str) -> ServedModel | None:
        if name == self.core.model_name:
            return self.core.served
        return self.core.registry.files_of(name)

    def _card(self, name: str) -> dict[str, Any]:
        served = self._files(name)
        path = Path(served.path) if served is not None else None
        size, modified = _file_stats(path)
        gguf_file = gguf_file_of(path)
        details = {"parent_model": "", "format": "gguf" if gguf_file else "safetensors" if path else "",
                   "family": "", "families": None, "parameter_size": "", "quantization_level": ""}  # fmt: skip
        if served is not None and served.config is not None:
            family = served.config.architecture
            details |= {"family": family, "families": [family], "parameter_size": _count(_parameters(served))}
        if gguf_file is not None:
            details["quantization_level"] = gguf_file_type(str(gguf_file))
        digest = hashlib.sha256(f"{path or name}:{size}:{modified}".encode()).hexdigest()
        listed = name if ":" in name else name + LATEST
        return {"name": listed, "model": listed, "modified_at": _stamp(modified), "size": size, "digest": digest,
                "details": details}  # fmt: skip

    def _context(self, name: str) -> dict[str, Any]:
        embedder = self.core.embedder(name)
        if embedder is not None:
            return {"context_length": embedder.max_length}
        served = self._files(name)
        return {"context_length": served.max_model_len} if served is not None and served.max_model_len else {}

    def _model_info(self, name: str, served: ServedModel | None) -> dict[str, Any]:
        embedder = self.core.embedder(name)
        if embedder is not None:
            return {"general.architecture": "embedding", "embedding.embedding_length": embedder.dim,
                    "embedding.context_length": embedder.max_length}  # fmt: skip
        if served is None or served.config is None:
            return {}
        config, arch = served.config, served.config.architecture
        info = {"general.architecture": arch, "general.parameter_count": _parameters(served),
                f"{arch}.embedding_length": config.hidden_size, f"{arch}.block_count": config.num_layers,
                f"{arch}.attention.head_count": config.num_heads,
                f"{arch}.attention.head_count_kv": config.num_kv_heads}  # fmt: skip
        if served.max_model_len:
            info[f"{arch}.context_length"] = served.max_model_len
        return info


def _capabilities(served: ServedModel | None, template: str) -> list[str]:
    """What a chat model can do, as its template and encoders say: completion always; tools where it is given them
    (its template shows them, or the fallback's does); thinking where it can turn thinking on; vision with an image
    encoder."""
    found = ["completion"]
    if takes_tools(template):
        found.append("tools")
    if "enable_thinking" in template or "<think>" in template or "reasoning" in template:
        found.append("thinking")
    if served is not None and served.config is not None and served.config.vision is not None:
        found.append("vision")
    return found


def _parameters(served: ServedModel) -> int:
    return ModelShape.of(served.config).num_params()


def _count(parameters: int) -> str:
    """Ollama's parameter size: 135M, 8.0B."""
    if parameters >= 10**9:
        return f"{parameters / 10**9:.1f}B"
    return f"{parameters / 10**6:.0f}M"


def gguf_file_of(path: Path | None) -> Path | None:
    """The GGUF file a model is: the path itself, or the one in its directory (the model cache's entries hold the
    file beside its tokenizer); None for a checkpoint of safetensors."""
    if path is None or not path.exists():
        return None
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    return next(iter(sorted(path.glob("*.gguf"))), None)


def _file_stats(path: Path | None) -> tuple[int, float]:
    """(bytes, modification time) of a model's file, or of a checkpoint directory's weight files."""
    if path is None or not path.exists():
        return 0, 0.0
    if path.is_file():
        stat = path.stat()
        return stat.st_size, stat.st_mtime
    files = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")]
    return sum(p.stat().st_size for p in files), max((p.stat().st_mtime for p in files), default=path.stat().st_mtime)


def _stamp(mtime: float) -> str:
    return datetime.fromtimestamp(mtime, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@functools.lru_cache(maxsize=32)
def gguf_file_type(path: str) -> str:
    """A GGUF's quantization as Ollama names it (Q4_K_M, Q4_1, F16), from its `general.file_type`; else its
    weights' most common kind."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is not None:
        try:
            name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    kinds = [t.tensor_type.name for t in reader.tensors if len(t.shape) == 2]
    return max(set(kinds), key=kinds.count) if kinds else ""
