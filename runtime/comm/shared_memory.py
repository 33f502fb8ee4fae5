"""Tensors between processes on one host through shared memory: the ZeroMQ message carries a handle, not the bytes.

A link whose both ends are on this host (an ipc:// endpoint, or tcp:// to one of this host's addresses) may send a
tensor as a `Handle` (segment name, fill, offset, dtype, shape) to a segment in /dev/shm; the receiver maps the
segment and gets a tensor over it without a copy. Fresh pages cost more than the copy (the kernel zeroes and maps each
4 KiB on first touch: ~25 ms for a 47 MB KV against a 2 ms memcpy), so segments are kept and reused, as vLLM's
shm_broadcast ring is:

    sender   `Arena` (one per process, `arena()`): slots of shared memory. `Link.share` copies a tensor into a free
             slot, or sends none of its bytes when the tensor already lives in one (`Arena.empty`: a producer that
             builds its tensor there, e.g. a KV gathered straight into shared memory, sends it without any copy).
    receiver `Mappings` (one per process): maps a slot the first time a handle names it, unlinks its name at once and
             keeps the mapping; a decoded tensor views it. When the last view of it dies the receiver counts the
             slot released in its header, and the sender may fill it again.

Nothing outlives both processes: once mapped a slot has no name, so its memory goes when the last of the two unmaps
it. A name exists only while a slot is on its way, and is removed by whoever learns the receiver will never map it:
the sender when its link closes (at once if the receiver is known dead, after `linger_s` if it never heard from it;
left for a live receiver that still has it queued), and `sweep` (when an arena starts and when a bridge closes) for
names whose creator and heir are both dead. The sender also gives up slots whose receiver died, whose releases will
never come. A slot serves the one receiver that mapped it. A handle to a segment that is gone, stale or too small is
a `SegmentError`, which the wire turns into a `WireError` for that one message. Linux only (`available`); other
links keep ZeroMQ frames."""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import math
import mmap
import os
import re
import secrets
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import structlog

if TYPE_CHECKING:
    import torch

log = structlog.get_logger("sagellm.shared_memory")

SHM_DIR = "/dev/shm"
PREFIX = "sagellm-kv-"  # every segment we create: sagellm-kv-{creator pid}-{serial}-{random}
_NAME = re.compile(r"sagellm-kv-(\d+)-\d+-[0-9a-f]{8}")
# A slot's header: int64 words before its payload, each written by one side only. The sender's: MAGIC, FILL (which
# content the payload holds), SENT (handles sent), HEIR (the receiver it left the name to when it closed), RETIRED (it
# gave the slot up). The receiver's: RELEASED (handles whose tensors are gone), ATTACHED (its pid, once mapped).
HEADER = 64
_MAGIC, _FILL, _SENT, _RELEASED, _ATTACHED, _HEIR, _RETIRED = range(7)
MAGIC = 0x3156_4B4D_4C4C_4753  # b"SGLLMKV1"
DEFAULT_MAX_BYTES = 2 << 30  # an arena's slots, at most (and at most a quarter of /dev/shm: a container's is small)
DEFAULT_LINGER_S = 1.0  # how long closing a link waits for an unknown receiver to map what was sent


class SegmentError(ValueError):
    """A handle the receiver cannot turn into a tensor: the segment is gone, refilled, or smaller than it says."""


class Handle(msgspec.Struct, array_like=True):
    """What travels in place of a tensor's bytes."""

    segment: str  # the slot's name in /dev/shm
    fill: int  # which filling of the slot holds the tensor
    offset: int  # bytes into the slot's payload
    dtype: str  # torch dtype name without "torch."
    shape: list[int]


class _Slot:
    """A sender's segment: its mapping, header words, and what the sender knows of its use."""

    def __init__(self, name: str, path: str, mm: mmap.mmap) -> None:
        self.name, self.path, self.mm = name, path, mm
        self.words = np.frombuffer(mm, dtype=np.int64, count=HEADER // 8)
        self.capacity = len(mm) - HEADER
        self.address = np.frombuffer(mm, dtype=np.uint8, offset=HEADER).ctypes.data
        self.receiver: str | None = None  # the link it was first sent on, and from then on only that one
        self.held = 0  # tensors from `Arena.empty` alive over it
        self.named = True  # its name is in /dev/shm (until the receiver maps it, or we remove it)

    def in_flight(self) -> bool:
        return self.words[_SENT] != self.words[_RELEASED]

    def free(self) -> bool:
        return self.held == 0 and not self.in_flight()

    def view(self, nbytes: int) -> np.ndarray:
        """A fresh array over the payload's start (its own object: its finalizer tells when every view is gone)."""
        return np.frombuffer(self.mm, dtype=np.uint8, count=nbytes, offset=HEADER)

    def unlink(self) -> None:
        if self.named:
            self.named = False
            _unlink(self.path)


class Arena:
    """A process's shared-memory slots for sending tensors; `link(endpoint)` per receiving socket."""

    def __init__(self, *, max_bytes: int | None = None, directory: str = SHM_DIR) -> None:
        if max_bytes is None:
            fs = os.statvfs(directory)
            max_bytes = min(DEFAULT_MAX_BYTES, fs.f_blocks * fs.f_frsize // 4)
        self.max_bytes, self.directory = max_bytes, directory
        self.slots: list[_Slot] = []
        self._serial = itertools.count()
        self._lock = threading.RLock()  # a producer thread may allocate while the event loop sends
        sweep(directory)

    def link(self, receiver: str) -> Link:
        return Link(self, receiver)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor in shared memory (ordinary memory when the arena is full): fill it, send it, and
        no byte of it is copied on the way. As with any sent tensor, never write into it after sending it."""
        import torch

        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            self._reap()
            slot = self._free_slot(None, nbytes) if nbytes else None
            if slot is None:
                return torch.empty(shape, dtype=dtype)
            slot.words[_FILL] += 1
            slot.held += 1
            array = slot.view(nbytes)
        weakref.finalize(array, self._unhold, slot)
        return torch.from_numpy(array).view(dtype).view(shape)

    def share(self, tensor: torch.Tensor, receiver: str) -> Handle | None:
        """A handle to `tensor` in a slot bound to `receiver` (copied in unless it already lives in one); None when
        no slot can take it, and the caller sends the bytes instead."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            return None
        with self._lock:
            self._reap()
            slot, offset = self._holding(tensor, receiver), 0
            if slot is not None:
                offset = tensor.data_ptr() - slot.address
            else:
                slot = self._free_slot(receiver, nbytes)
                if slot is None:
                    return None
                slot.words[_FILL] += 1
                _over(slot.view(nbytes), tensor.dtype, tensor.shape).copy_(tensor)
            slot.receiver = receiver
            slot.words[_SENT] += 1
            dtype = str(tensor.dtype).removeprefix("torch.")
            return Handle(slot.name, int(slot.words[_FILL]), offset, dtype, list(tensor.shape))

    def close(self, receiver: str | None = None, linger_s: float = DEFAULT_LINGER_S) -> None:
        """Gives up the slots bound to `receiver` (all, with None). What was sent and not yet mapped stays named
        for a receiver alive to map it; for one that is dead, or unknown after `linger_s`, the name is removed."""
        deadline = time.monotonic() + linger_s
        with self._lock:
            for bound in {s.receiver for s in self.slots} if receiver is None else {receiver}:
                self._close_link([s for s in self.slots if s.receiver == bound], deadline)

    def _close_link(self, slots: list[_Slot], deadline: float) -> None:
        waiting = [s for s in slots if s.named and s.in_flight()]
        while waiting and not _receiver(slots) and time.monotonic() < deadline:
            time.sleep(0.01)  # an unknown receiver: has it mapped them yet?
            waiting = [s for s in waiting if not s.words[_ATTACHED]]
        heir = _receiver(slots)
        for slot in slots:
            if slot.named and slot.in_flight() and not slot.words[_ATTACHED] and heir:
                slot.words[_HEIR] = heir  # its live receiver maps it later and removes the name; else `sweep` does
                slot.named = False
            self._retire(slot)

    def _unhold(self, slot: _Slot) -> None:
        with self._lock:
            slot.held -= 1

    def _holding(self, tensor: torch.Tensor, receiver: str) -> _Slot | None:
        """The slot `tensor` lives in, if it may go to `receiver` without a copy."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            return None
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        for slot in self.slots:
            if slot.address <= start and end <= slot.address + slot.capacity:
                return slot if slot.receiver in (None, receiver) else None
        return None

    def _free_slot(self, receiver: str | None, nbytes: int) -> _Slot | None:
        """The smallest free slot for `receiver` (any, with None) that holds `nbytes`; else a new one, retiring free
        slots to stay under `max_bytes`; None when that cannot be."""
        fits = [s for s in self.slots if s.free() and s.capacity >= nbytes]
        if receiver is not None:
            fits = [s for s in fits if s.receiver in (None, receiver)]  # another receiver could not map it
        if fits:
            return min(fits, key=lambda s: (s.receiver != receiver, s.capacity))  # already its receiver's: mapped
        capacity = _rounded(nbytes)
        for slot in sorted((s for s in self.slots if s.free()), key=lambda s: s.capacity):
            if self._total() + capacity <= self.max_bytes:
                break
            self._retire(slot)
        if self._total() + capacity > self.max_bytes:
            return None
        try:
            slot = self._create(capacity)
        except OSError as error:  # /dev/shm full (a container's 64 MB?): send bytes instead
            log.warning("shared_memory_unavailable", bytes=capacity, error=str(error))
            return None
        self.slots.append(slot)
        return slot

    def _create(self, capacity: int) -> _Slot:
        name = f"{PREFIX}{os.getpid()}-{next(self._serial)}-{secrets.token_hex(4)}"
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, HEADER + capacity)  # no space is an error now, not a SIGBUS on first write
            mm = mmap.mmap(fd, HEADER + capacity)
        except BaseException:
            _unlink(path)
            raise
        finally:
            os.close(fd)
        slot = _Slot(name, path, mm)
        slot.words[_MAGIC] = MAGIC
        return slot

    def _reap(self) -> None:
        """Slots whose receiver died are retired: no release will ever come for them."""
        for slot in list(self.slots):
            attached = int(slot.words[_ATTACHED])
            if attached:
                slot.named = False  # the receiver removed the name when it mapped the slot
                if not _alive(attached):
                    self._retire(slot)

    def _retire(self, slot: _Slot) -> None:
        slot.words[_RETIRED] = 1
        slot.unlink()
        self.slots.remove(slot)  # the mapping goes with the last tensor over it

    def _total(self) -> int:
        return sum(s.capacity for s in self.slots)


class Link:
    """An arena's side of one sending socket: what `wire.encode` asks for a handle."""

    def __init__(self, arena: Arena, receiver: str) -> None:
        self.arena, self.receiver = arena, receiver

    def share(self, tensor: torch.Tensor) -> Handle | None:
        return self.arena.share(tensor, self.receiver)

    def close(self, linger_s: float = DEFAULT_LINGER_S) -> None:
        self.arena.close(self.receiver, linger_s)


class _Mapped:
    """A receiver's mapping of a sender's slot."""

    def __init__(self, mm: mmap.mmap, owner: int) -> None:
        self.mm, self.owner = mm, owner
        self.words = np.frombuffer(mm, dtype=np.int64, count=HEADER // 8)
        self.capacity = len(mm) - HEADER


class Mappings:
    """A process's mappings of the slots it received handles to (the receiving side of every link)."""

    def __init__(self, directory: str = SHM_DIR) -> None:
        self.directory = directory
        self.segments: dict[str, _Mapped] = {}
        self._lock = threading.RLock()  # a tensor may die on any thread, or in a collection while this one holds it

    def tensor(self, handle: Handle) -> torch.Tensor:
        """The tensor `handle` names, over the slot's memory; SegmentError if it cannot be."""
        import torch

        dtype = getattr(torch, handle.dtype, None)
        if not isinstance(dtype, torch.dtype) or any(n < 0 for n in handle.shape):
            raise SegmentError(f"segment {handle.segment}: bad dtype {handle.dtype!r} or shape {handle.shape}")
        with self._lock:
            segment = self.segments.get(handle.segment) or self._map(handle.segment)
            if segment.words[_FILL] != handle.fill:
                raise SegmentError(f"segment {handle.segment} was refilled: the handle (fill {handle.fill}) is stale")
            nbytes = math.prod(handle.shape) * dtype.itemsize
            if handle.offset < 0 or handle.offset % dtype.itemsize or handle.offset + nbytes > segment.capacity:
                raise SegmentError(
                    f"segment {handle.segment} holds {segment.capacity} bytes; a {handle.dtype} tensor of shape "
                    f"{handle.shape} at offset {handle.offset} needs {nbytes}"
                )
            array = np.frombuffer(segment.mm, dtype=np.uint8, count=nbytes, offset=HEADER + handle.offset)
            self._forget()
        weakref.finalize(array, self._release, segment)
        return _over(array, dtype, handle.shape)

    def _map(self, name: str) -> _Mapped:
        match = _NAME.fullmatch(name)
        if match is None:
            raise SegmentError(f"{name!r} is not the name of a sageLLM shared-memory segment")
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise SegmentError(
                f"shared-memory segment {name} no longer exists: its sender gave it up (it closed the link, or took "
                "this receiver for dead) or another process mapped it"
            ) from None
        except OSError as error:
            raise SegmentError(f"cannot open shared-memory segment {name}: {error}") from None
        try:
            size = os.fstat(fd).st_size
            if size <= HEADER:
                raise SegmentError(f"shared-memory segment {name} holds {size} bytes, no payload")
            mm = mmap.mmap(fd, size)
        except OSError as error:
            raise SegmentError(f"cannot map shared-memory segment {name}: {error}") from None
        finally:
            os.close(fd)
        segment = _Mapped(mm, int(match[1]))
        if segment.words[_MAGIC] != MAGIC:
            raise SegmentError(f"{name} is not a sageLLM shared-memory segment (no header)")
        _unlink(path)  # mapped: the name is not needed any more, and a crash from now on leaks nothing
        segment.words[_ATTACHED] = os.getpid()
        self.segments[name] = segment
        return segment

    def _forget(self) -> None:
        """Drops the mappings no handle will name again: retired by their sender, or their sender is dead (once
        nothing sent in them waits to be received). Each is unmapped when its last tensor goes."""
        for name, segment in list(self.segments.items()):
            idle = segment.words[_SENT] == segment.words[_RELEASED]
            if idle and (segment.words[_RETIRED] or not _alive(segment.owner)):
                del self.segments[name]

    def _release(self, segment: _Mapped) -> None:
        with self._lock:
            segment.words[_RELEASED] += 1


def sweep(directory: str = SHM_DIR) -> list[str]:
    """Removes the segments that nobody will map: their creator is dead and so is the receiver it left them to (a
    crash of both, or of a sender before it could close). Returns their names."""
    removed = []
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        match = _NAME.fullmatch(name)
        if match is None or _alive(int(match[1])):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as file:
                words = np.frombuffer(file.read(HEADER).ljust(HEADER, b"\0"), dtype=np.int64)
        except OSError:
            continue  # mapped (and removed) by its receiver meanwhile
        if not (words[_HEIR] and _alive(int(words[_HEIR]))):
            _unlink(path)
            removed.append(name)
    return removed


def is_local(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint is on this host: ipc://, or tcp:// on loopback or on an address of this host's own
    (two Ray actors on one node reach each other at the node's address)."""
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    if not endpoint.startswith("tcp://"):
        return False
    return host == "localhost" or host.startswith("127.") or _own_address(host)


@functools.cache
def _own_address(host: str) -> bool:
    """Whether `host` is an address of this host: one a socket can be bound to here (the wildcard is none)."""
    if host in ("0.0.0.0", "::", "*"):
        return False
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
    except OSError:  # another host's address, or a name that does not resolve to one of ours
        return False
    return True


def available(directory: str = SHM_DIR) -> bool:
    return os.path.isdir(directory) and os.access(directory, os.W_OK)


_arena: Arena | None = None
_mappings = Mappings()


def arena() -> Arena:
    """This process's arena (made on first use; its slots are given up at exit)."""
    global _arena
    if _arena is None:
        _arena = Arena()
        atexit.register(_arena.close)
    return _arena


def link_to(endpoint: str) -> Link | None:
    """The shared-memory side of a socket sending to `endpoint`; None when that is not on this host."""
    return arena().link(endpoint) if is_local(endpoint) and available() else None


def tensor_of(handle: Handle) -> torch.Tensor:
    """A received handle's tensor (this process's mappings)."""
    return _mappings.tensor(handle)


def _over(array: np.ndarray, dtype: torch.dtype, shape: list[int] | torch.Size) -> torch.Tensor:
    import torch

    if array.nbytes == 0:
        return torch.empty(list(shape), dtype=dtype)
    return torch.from_numpy(array).view(dtype).view(list(shape))


def _rounded(nbytes: int) -> int:
    """A slot size for `nbytes`: in steps of an eighth of its power of two (>= 1 MiB), so sizes repeat."""
    step = max(1 << 20, 1 << max(0, nbytes.bit_length() - 4))
    return -(-nbytes // step) * step


def _receiver(slots: list[_Slot]) -> int:
    """The pid of the live process that maps these slots (0: none is known)."""
    return next((pid for s in slots if (pid := int(s.words[_ATTACHED])) and _alive(pid)), 0)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
