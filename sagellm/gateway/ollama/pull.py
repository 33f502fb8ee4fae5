"""`/api/pull` as Ollama answers it. A model served here whose files are on disk is there already: success at once. A
model on demand named by a Hugging Face id (or a built-in alias) and not yet downloaded is downloaded into the
model cache now, so the request that loads it later does not wait for it; its progress streams as Ollama streams a
pull's: `pulling manifest`, then a line per file as its bytes arrive (`pulling NAME`, `digest`, `total`,
`completed`), then `success`; a failure ends the stream with `{"error": ...}` (a whole reply: a 502, the Hub
failed, not the client).

A download runs in a thread of its own: it goes on when its client leaves (what it fetched is the cache's), and a
second pull of the same model follows the download under way rather than starting another."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import trio

from sagellm.gateway.http.app import LastEvents
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.core import ServingCore
from sagellm.runtime.models.hub_download import DownloadProgress
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.model_cache import download_model, to_download

POLL_S = 0.25  # how often a streamed pull looks at its download's progress


@dataclass
class Download:
    source: str  # the alias or Hugging Face id
    progress: DownloadProgress = field(default_factory=DownloadProgress)
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None

    def run(self) -> None:
        try:
            download_model(self.source, progress=self.progress)
        except ModelLoadError as error:
            self.error = str(error)
        except Exception as error:  # noqa: BLE001 -- the thread's end: any failure is the pull's answer
            self.error = f"{self.source}: download failed: {type(error).__name__}: {error}"
        finally:
            self.done.set()


class Pulls:
    def __init__(self, core: ServingCore) -> None:
        self.core = core
        self._downloads: dict[str, Download] = {}

    def source_to_download(self, name: str) -> str | None:
        """What pulling the served model `name` downloads: its source when it is a model on demand of ours whose
        files are not here yet; None when there is nothing to fetch."""
        pool = self.core.readiness.models_on_demand
        if pool is None or name not in pool.models or pool.models[name].spec.kind != "llm":
            return None
        return to_download(pool.models[name].spec.model)

    def start(self, source: str) -> Download:
        """The download of `source` under way, or a new one started."""
        download = self._downloads.get(source)
        if download is None or download.done.is_set():
            download = self._downloads[source] = Download(source)
            threading.Thread(target=download.run, name=f"pull {source}", daemon=True).start()
        return download

    async def finished(self, download: Download) -> dict[str, Any]:
        """`success` once the download is done; a 502 naming why it failed."""
        while not download.done.is_set():
            await trio.sleep(POLL_S)
        if download.error is not None:
            raise ApiError(502, download.error, code="download_failed")
        return {"status": "success"}


async def pull_lines(download: Download) -> AsyncIterator[Any]:
    """The download's progress as Ollama's pull lines, each file's as it grows, until it ends."""
    yield ({"status": "pulling manifest"},)
    said: dict[int, int] = {}  # file index -> the bytes a line said
    while True:
        finished = download.done.is_set()  # read before the progress, so the last look sees every byte
        lines = []
        for index, file in enumerate(download.progress.files[: download.progress.current + 1]):
            completed = file.completed
            if said.get(index) != completed:
                said[index] = completed
                lines.append({"status": f"pulling {file.name}", "digest": file.digest, "total": file.total,
                              "completed": completed})  # fmt: skip
        if finished:
            end = {"error": download.error} if download.error is not None else {"status": "success"}
            yield LastEvents((*lines, end))
            return
        if lines:
            yield tuple(lines)
        await trio.sleep(POLL_S)
