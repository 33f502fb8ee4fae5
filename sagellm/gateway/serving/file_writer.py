"""Files written behind the event loop: the records the gateway keeps of what it answers (a stored response and its
later states) are written in the order asked by a thread of their own, so a request never waits on the disk.

One writer per directory, for the process's life: a gateway started again in the same process (`sagellm run-batch`,
the tests) waits for the writes its predecessor left in flight before it reads the directory (`settle`). The thread
is not a daemon and ends when nothing is left to write, so a process that exits normally writes everything first;
one killed loses at most what was in flight, as a crash would."""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import ClassVar

import structlog

from sagellm.common.private_files import write_private

log = structlog.get_logger("sagellm.gateway")


class FileWriter:
    _by_dir: ClassVar[dict[Path, FileWriter]] = {}
    _made = threading.Lock()

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._queue: deque[tuple[Path, bytes | None]] = deque()
        self._thread: threading.Thread | None = None

    @classmethod
    def of(cls, root: Path) -> FileWriter:
        """The writer of the files under `root`."""
        with cls._made:
            return cls._by_dir.setdefault(root.resolve(), cls(root))

    def write(self, name: str, data: bytes) -> None:
        """Writes `data` as the file `name` under the root, readable by its owner only (atomically)."""
        self._put(self.root / name, data)

    def remove(self, name: str) -> None:
        self._put(self.root / name, None)

    def settle(self) -> None:
        """Waits until every write asked for so far is on disk."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()

    def _put(self, path: Path, data: bytes | None) -> None:
        with self._lock:
            self._queue.append((path, data))
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name=f"sagellm-writer-{self.root.name}")
                self._thread.start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                path, data = self._queue.popleft()
            try:
                if data is None:
                    path.unlink(missing_ok=True)
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_private(path, data)
            except OSError as error:  # a full disk: the record stays in memory, the next write may succeed
                log.warning("state_write_failed", path=str(path), error=str(error))
