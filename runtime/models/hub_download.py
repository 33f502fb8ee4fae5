"""A Hugging Face repository's model files downloaded one at a time, each file's bytes counted as they arrive, so a
caller can show how far a download is (`/api/pull` streams it as Ollama streams its layers: one file, its digest,
its size and the bytes so far).

The files are those a model needs (configs, safetensors, chat templates, tokenizers), listed with their sizes and
digests before the first is fetched, all at the revision the listing saw, so a repository updated meanwhile cannot
mix two revisions. The Hub is `HF_ENDPOINT`, read at each download (a mirror, or a test's own server)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from fnmatch import fnmatch
from functools import partial
from pathlib import Path
from typing import Any

MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model")


@dataclass
class FileProgress:
    name: str  # its path in the repository
    digest: str  # "sha256:<hex>" of a large (LFS) file; else the git blob id, "sha1:<hex>"
    total: int  # bytes
    completed: int = 0


@dataclass
class DownloadProgress:
    """How far a download is. Written by the downloading thread, read by another: each field is replaced or
    incremented whole, so a reader sees a consistent number, perhaps an instant old."""

    files: list[FileProgress] = field(default_factory=list)  # empty until the repository is listed
    current: int = 0  # the index of the file being fetched (len(files) once all are)


def fetch_hub_model(repo_id: str, directory: Path, progress: DownloadProgress | None = None) -> None:
    """Downloads `repo_id`'s model files into `directory`; `progress` (when given) follows each file's bytes, else
    the Hub's own progress bars show them."""
    from huggingface_hub import HfApi, hf_hub_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    info = HfApi(endpoint=endpoint).model_info(repo_id, files_metadata=True)
    wanted = [s for s in info.siblings or () if any(fnmatch(s.rfilename, p) for p in MODEL_FILES)]
    files = [FileProgress(s.rfilename, _digest(s), s.size or 0) for s in wanted]
    if progress is not None:
        progress.files = files
    for index, file in enumerate(files):
        if progress is not None:
            progress.current = index
        bar = partial(_FileBar, file) if progress is not None else None
        hf_hub_download(repo_id, file.name, revision=info.sha, local_dir=directory, endpoint=endpoint, tqdm_class=bar)
        file.completed = file.total
    if progress is not None:
        progress.current = len(files)


def _digest(sibling: Any) -> str:
    if sibling.lfs is not None:
        return f"sha256:{sibling.lfs.sha256}"
    return f"sha1:{sibling.blob_id}" if sibling.blob_id else ""


class _FileBar:
    """What `hf_hub_download` drives as a file's progress bar (its `tqdm_class`): the bytes counted into the file's
    FileProgress. Its display calls (a postfix, a refresh, a transfer rate) show nothing here."""

    def __init__(self, file: FileProgress, *_: Any, total: int | None = None, initial: int = 0, **__: Any) -> None:
        self.file = file
        file.total = total or file.total
        file.completed = initial or 0

    def update(self, n: float | None = 1) -> None:
        self.file.completed += int(n or 0)

    def __enter__(self) -> _FileBar:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def __getattr__(self, _name: str) -> Any:  # close, refresh, set_postfix_str, update_transfer, ...: display only
        return _nothing


def _nothing(*_: Any, **__: Any) -> None:
    return None
