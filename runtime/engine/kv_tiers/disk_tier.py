"""The disk tier: KV block payloads in files that every instance on the host naming the same directory shares.

Truth is the filesystem, so instances need no coordination on the data path. A block is published by writing a
private `.part` file and hard-linking it to its final name, which is atomic: a reader sees a whole file or none, and
two writers of one block (whose bytes are identical, `block_file`) race harmlessly. A reader verifies everything the
file claims before serving it and moves a bad file aside. The directory stays within its budget by one janitor at a
time (an flock), which deletes the least recently used files (a hit touches the mtime) and the litter of crashes.

Files live under DIR/sagellm-kv-v1/<ns>/, where <ns> names everything that makes KV bytes differ (the identity), so
engines of different models or layouts never see each other's blocks; layout.json holds that identity in clear, so a
hand-copied directory or a hash-prefix collision is refused instead of served."""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import itertools
import json
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import structlog
import torch

from sagellm.common.errors import InvalidInput
from sagellm.runtime.engine.kv_tiers.block_file import (
    GROUPS,
    BadBlock,
    BlockKey,
    BlockMeta,
    check_name,
    encode_header,
    read_block,
    read_header,
)
from sagellm.runtime.engine.kv_tiers.identity import canonical, identity_digest

log = structlog.get_logger("sagellm.kv_tiers")

ROOT = "sagellm-kv-v1"
LAYOUT_FORMAT = 1
SWEEP_INTERVAL_S = 10.0
SWEEP_RETRY_S = 0.25  # the least time between sweeps forced by the byte estimate, or after another held the lock
HIGH_WATER, LOW_WATER = 0.95, 0.90  # a sweep starts above HIGH_WATER of the budget and deletes down to LOW_WATER
STALE_PART_S = 600.0  # a .part this old belongs to a writer that died
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP}  # vfat, some FUSE: os.replace is atomic too


class ForeignLayout(InvalidInput):
    """The directory's namespace holds blocks of another model or layout (its layout.json differs from ours)."""


class _File(NamedTuple):
    mtime_ns: int
    size: int
    path: str
    key: BlockKey


class DiskTier:
    """Stores and loads opaque block payloads (contiguous uint8 CPU tensors) under a directory shared by instances.

    `write` publishes synchronously; `submit` hands a payload to the background writer thread, which also runs the
    janitor. Metrics: `bytes_used` (this instance's estimate of the namespace's bytes), `written`, `write_errors`,
    `dropped` (submits refused by a full queue or a closing tier), `bad_files` (by why), `sweeps` (janitor passes this
    instance ran). `on_removed` is called from the writer thread for each block this instance's janitor deletes."""

    def __init__(
        self,
        directory: str | os.PathLike,
        identity: Mapping[str, Any],
        budget_bytes: int,
        *,
        max_queued: int = 4096,
        on_removed: Callable[[BlockKey], None] | None = None,
    ) -> None:
        self._identity_sha = identity_digest(identity)
        self.namespace = self._identity_sha.hex()[:16]
        self.root = Path(directory) / ROOT / self.namespace
        self.budget_bytes = budget_bytes
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._part_numbers = itertools.count()
        self._publish_layout({"format": LAYOUT_FORMAT, "identity": json.loads(canonical(identity))})

        self.on_removed = on_removed  # given here, it misses no deletion: the first sweep may run at once
        # Called from the writer thread as each submitted block is done with: (key, meta, whether it is on disk now).
        self.on_written: Callable[[BlockKey, BlockMeta, bool], None] | None = None
        self.bytes_used = self.written = self.write_errors = self.dropped = self.sweeps = 0
        self.bad_files: collections.Counter[str] = collections.Counter()
        self._state = threading.Condition()  # guards the queue and the metrics; never held across I/O
        self._jobs: collections.deque[tuple[BlockKey, BlockMeta, torch.Tensor]] = collections.deque()
        self._max_queued = max_queued
        self._pending = 1  # writes queued or under way, and the start scan (flush waits for the writer to be idle)
        self._scanned = False
        self._closing = False
        self._close_deadline = 0.0
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        self._last_sweep = -SWEEP_RETRY_S  # monotonic time of the last try (a sweep over budget may start at once)
        self._lock_fd = os.open(self.root / ".janitor.lock", os.O_RDWR | os.O_CREAT, 0o666)
        self._writer = threading.Thread(target=self._run_writer, name=f"kv-disk-{self.namespace}", daemon=True)
        self._writer.start()

    def contains(self, key: BlockKey) -> bool:
        """Whether a published file holds `key` (any instance's): one stat, no read."""
        return os.path.exists(self._path(key))

    def read_into(self, key: BlockKey, meta: BlockMeta, out: torch.Tensor) -> bool:
        """Read `key`'s payload into `out` if its file passes every check (block_file.read_block); False on a miss or
        a bad file (moved aside as <name>.bad.<pid> and counted). `out` holds garbage after False."""
        view = _bytes_of(out)
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as file:
                read_block(file, self._identity_sha, key, meta, view)
        except FileNotFoundError:  # never written, or deleted by a janitor while we looked
            return False
        except BadBlock as bad:
            self._quarantine(path, bad)
            return False
        except OSError as error:  # EIO, EACCES: a miss; the block is recomputed
            log.warning("kv_disk_read_failed", path=str(path), error=str(error))
            return False
        _touch(path)  # mtime is recency for every instance's janitor
        return True

    def write(self, key: BlockKey, meta: BlockMeta, payload: torch.Tensor) -> bool:
        """Publish `payload` under `key` now; True when the file exists afterwards (ours or an identical one another
        writer published first), False (counted) when the filesystem refused (disk full...). A `meta` that does not
        hash to `key` is the caller's bug: ValueError."""
        check_name(key, meta)
        data = _bytes_of(payload)
        header = encode_header(self._identity_sha, key, meta, len(data), zlib.crc32(data))
        path = self._path(key)
        part = self._part_path(f"{key.block_hash:016x}")
        try:
            with open(part, "wb") as file:
                file.write(header)
                file.write(data)
            published = _publish(part, path)
        except OSError as error:
            with self._state:
                self.write_errors += 1
                first = self.write_errors == 1
            if first or self.write_errors % 1000 == 0:
                log.warning("kv_disk_write_failed", path=str(path), error=str(error), failures=self.write_errors)
            return False
        finally:
            _unlink_quietly(part)
        with self._state:
            self.written += 1
            self.bytes_used += (len(header) + len(data)) if published else 0
            if self.bytes_used > HIGH_WATER * self.budget_bytes:
                self._state.notify_all()  # the writer thread sweeps
        return True

    def submit(self, key: BlockKey, meta: BlockMeta, payload: torch.Tensor) -> bool:
        """Queue `payload` (now the writer's: do not modify it) for the writer thread; never waits. A full queue or a
        closing tier drops it (counted in `dropped`, False): a block not stored is only a block recomputed later."""
        check_name(key, meta)
        _bytes_of(payload)  # a caller's bug surfaces in the caller's thread
        with self._state:
            if self._closing or len(self._jobs) >= self._max_queued:
                self.dropped += 1
                return False
            self._jobs.append((key, meta, payload))
            self._pending += 1
            self._state.notify_all()
        return True

    def flush(self, timeout_s: float) -> int:
        """Wait until every submitted payload is written (and the start scan done); how many writes were left when
        `timeout_s` ran out."""
        deadline = time.monotonic() + timeout_s
        with self._state:
            while self._pending and (left := deadline - time.monotonic()) > 0:
                self._state.wait(left)
            return self._pending - (not self._scanned)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, sweep once more so the directory is left within budget, and stop the writer thread;
        what is still queued at `timeout_s` is dropped. A second call returns at once."""
        with self._state:
            if self._closing:
                return
            self._closing = True
            self._close_deadline = time.monotonic() + timeout_s
            self._state.notify_all()
        self._writer.join(timeout_s)
        if not self._writer.is_alive():
            os.close(self._lock_fd)

    def meta_of(self, key: BlockKey) -> BlockMeta | None:
        """What a published block's hash is of, from its file's header (None: gone, or not a good header): what a
        start announces of the blocks already on disk."""
        try:
            with open(self._path(key), "rb", buffering=0) as file:
                _, stored_key, meta, _, _ = read_header(file, self._identity_sha, os.fstat(file.fileno()).st_size)
        except (OSError, BadBlock):
            return None
        return meta if stored_key == key else None

    def published(self) -> set[BlockKey]:
        """Every block published in this namespace, by any instance (a directory scan)."""
        return {key for key, _ in _published(self.root)}

    def _path(self, key: BlockKey) -> str:
        name = f"{key.block_hash:016x}"
        return os.path.join(self.root, key.group, name[:2], name + ".kvb")

    def _part_path(self, stem: str) -> Path:
        """A file name no other writer (process, thread, or earlier write of this thread) uses."""
        return self._tmp / f"{stem}.{os.getpid()}.{threading.get_native_id()}.{next(self._part_numbers)}.part"

    def _publish_layout(self, wanted: dict[str, Any]) -> None:
        """Create layout.json atomically if no instance has, then refuse the namespace unless it holds our identity."""
        path = self.root / "layout.json"
        if not path.exists():
            part = self._part_path("layout")
            part.write_text(json.dumps(wanted, sort_keys=True, indent=1) + "\n")
            try:
                _publish(part, path)
            finally:
                _unlink_quietly(part)
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            found = f"unreadable ({error})"
        if found != wanted:
            raise ForeignLayout(
                f"{path} describes KV blocks of another model or layout than this engine's "
                f"({found if isinstance(found, str) else 'identity differs'}): never served; "
                f"give this engine another KV offload directory, or delete {self.root}"
            )

    def _quarantine(self, path: str, bad: BadBlock) -> None:
        """Move a bad file aside for the janitor, once: a reader that loses the race leaves the count to the winner."""
        try:
            os.rename(path, f"{path}.bad.{os.getpid()}")
        except OSError:
            return
        with self._state:
            self.bad_files[bad.why] += 1
        log.warning("kv_disk_bad_file", path=path, why=bad.why, detail=str(bad))

    def _run_writer(self) -> None:
        """Write queued payloads in order, sweep when due, and at close finish the queue and sweep a last time."""
        estimate = sum(file.size for file in _block_files(self.root))  # what other instances and runs left
        with self._state:
            self.bytes_used += estimate
            self._scanned = True
            self._pending -= 1
            self._state.notify_all()
        while True:
            with self._state:
                while not self._jobs and not self._closing and (wait := self._seconds_to_sweep()) > 0:
                    self._state.wait(wait)
                if self._closing and self._jobs and time.monotonic() > self._close_deadline:
                    self.dropped += len(self._jobs)
                    self._pending -= len(self._jobs)
                    self._jobs.clear()
                    self._state.notify_all()
                job = self._jobs.popleft() if self._jobs else None
                closing = self._closing
            if job is not None:
                written = self.write(*job)
                if self.on_written is not None:
                    self.on_written(job[0], job[1], written)
                with self._state:
                    self._pending -= 1
                    self._state.notify_all()
            elif closing:
                self._sweep(wait_s=max(0.0, self._close_deadline - time.monotonic()))
                return
            if self._seconds_to_sweep() <= 0:
                self._last_sweep = time.monotonic()
                swept = self._sweep(wait_s=0.0)
                self._next_sweep = self._last_sweep + (SWEEP_INTERVAL_S if swept else SWEEP_RETRY_S)

    def _seconds_to_sweep(self) -> float:
        """Every SWEEP_INTERVAL_S, and sooner (SWEEP_RETRY_S apart) while the estimate is above HIGH_WATER."""
        due = self._next_sweep
        if self.bytes_used > HIGH_WATER * self.budget_bytes:
            due = min(due, self._last_sweep + SWEEP_RETRY_S)
        return due - time.monotonic()

    def _sweep(self, wait_s: float) -> bool:
        """One janitor pass, if this instance gets the directory's lock within `wait_s` (False when it did not): delete
        the oldest blocks down to LOW_WATER of the budget when above HIGH_WATER, bad files and stale parts."""
        if not _lock(self._lock_fd, wait_s):
            return False
        try:
            removed, used = _sweep_namespace(self.root, self.budget_bytes)
        except OSError as error:
            log.warning("kv_disk_sweep_failed", root=str(self.root), error=str(error))
            return True
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        with self._state:
            self.bytes_used = used
            self.sweeps += 1
        for key in removed:
            if self.on_removed is not None:
                try:
                    self.on_removed(key)
                except Exception:  # the engine's bug must not stop the writer: its queue would never drain
                    log.exception("kv_disk_on_removed_failed", key=str(key))
        return True


def _sweep_namespace(root: Path, budget_bytes: int) -> tuple[list[BlockKey], int]:
    """Delete litter and, above HIGH_WATER, the least recently used blocks; the keys deleted and the bytes left."""
    stale_before = time.time() - STALE_PART_S
    for entry in _entries(root / "tmp"):
        if entry.name.endswith(".part") and _mtime(entry) < stale_before:
            _unlink_quietly(entry.path)
    litter: list[str] = []
    files = sorted(_block_files(root, litter))
    for path in litter:
        _unlink_quietly(path)
    used = sum(file.size for file in files)
    removed: list[BlockKey] = []
    if used > HIGH_WATER * budget_bytes:
        for file in files:
            if used <= LOW_WATER * budget_bytes:
                break
            try:
                os.unlink(file.path)
            except FileNotFoundError:  # a reader moved it aside meanwhile
                pass
            else:
                removed.append(file.key)
            used -= file.size
    return removed, used


def _block_files(root: Path, litter: list[str] | None = None) -> list[_File]:
    """The namespace's published block files with their size and recency; the paths of bad files go to `litter`."""
    files: list[_File] = []
    for key, entry in _published(root, litter):
        try:
            stat = entry.stat()
        except FileNotFoundError:
            continue
        files.append(_File(stat.st_mtime_ns, stat.st_size, entry.path, key))
    return files


def _published(root: Path, litter: list[str] | None = None) -> Iterator[tuple[BlockKey, os.DirEntry[str]]]:
    """Every published block file (<hash:016x>.kvb) by key, from names alone; parts live elsewhere (tmp/)."""
    for group in GROUPS:
        for shard in _entries(root / group):
            for entry in _entries(shard.path):
                name = entry.name
                if len(name) == 20 and name.endswith(".kvb"):
                    with contextlib.suppress(ValueError):  # not hex: not ours
                        yield BlockKey(group, int(name[:16], 16)), entry
                elif litter is not None and ".bad." in name:
                    litter.append(entry.path)


def _entries(directory: str | Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _publish(part: Path, path: str | Path) -> bool:
    """Hard-link `part` to `path`; False when a file already has that name (touched: it was just wanted again)."""
    try:
        try:
            _link(part, path)
        except FileNotFoundError:  # the first block of its shard directory
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _link(part, path)
    except FileExistsError:
        _touch(path)
        return False
    return True


def _link(part: Path, path: str | Path) -> None:
    try:
        os.link(part, path)
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
        os.replace(part, path)  # overwriting identical bytes is harmless


def _lock(fd: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The tensor's own memory as flat bytes (no copy)."""
    if tensor.dtype != torch.uint8 or tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(
            f"block payloads are contiguous uint8 CPU tensors, got {tensor.dtype} on {tensor.device}"
            f"{'' if tensor.is_contiguous() else ' (not contiguous)'}"
        )
    return memoryview(tensor.numpy().reshape(-1))


def _touch(path: str | Path) -> None:
    with contextlib.suppress(OSError):  # gone meanwhile: nothing to keep
        os.utime(path)


def _unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(OSError):  # gone already, or not ours to delete: litter, not an error
        os.unlink(path)
