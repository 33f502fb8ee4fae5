"""The sending side: a process's `Arena` of shared-memory slots, and a `Link` per receiving socket. A tensor is copied
into a free slot bound to its receiver (or sent without a copy when it already lives in one), and a slot is filled
again once its receiver has released every tensor it was sent in it; slots whose receiver died are given up."""

from __future__ import annotations

import itertools
import math
import mmap
import os
import secrets
import threading
import time
import weakref
from typing import TYPE_CHECKING

import numpy as np
import structlog

from sagellm.runtime.comm.shared_memory.segments import (
    ATTACHED,
    FILL,
    HEADER,
    HEIR,
    MAGIC,
    MAGIC_WORD,
    PREFIX,
    RELEASED,
    RETIRED,
    SENT,
    SHM_DIR,
    Handle,
    alive,
    sweep,
    tensor_over,
    unlink_path,
)

if TYPE_CHECKING:
    import torch

log = structlog.get_logger("sagellm.shared_memory")

DEFAULT_MAX_BYTES = 2 << 30  # an arena's slots, at most (and at most a quarter of /dev/shm: a container's is small)
DEFAULT_LINGER_S = 1.0  # how long closing a link waits for an unknown receiver to map what was sent


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
        return self.words[SENT] != self.words[RELEASED]

    def free(self) -> bool:
        return self.held == 0 and not self.in_flight()

    def view(self, nbytes: int) -> np.ndarray:
        """A fresh array over the payload's start (its own object: its finalizer tells when every view is gone)."""
        return np.frombuffer(self.mm, dtype=np.uint8, count=nbytes, offset=HEADER)

    def unlink(self) -> None:
        if self.named:
            self.named = False
            unlink_path(self.path)


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
            slot.words[FILL] += 1
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
                slot.words[FILL] += 1
                tensor_over(slot.view(nbytes), tensor.dtype, tensor.shape).copy_(tensor)
            slot.receiver = receiver
            slot.words[SENT] += 1
            dtype = str(tensor.dtype).removeprefix("torch.")
            return Handle(slot.name, int(slot.words[FILL]), offset, dtype, list(tensor.shape))

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
            waiting = [s for s in waiting if not s.words[ATTACHED]]
        heir = _receiver(slots)
        for slot in slots:
            if slot.named and slot.in_flight() and not slot.words[ATTACHED] and heir:
                slot.words[HEIR] = heir  # its live receiver maps it later and removes the name; else `sweep` does
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
            unlink_path(path)
            raise
        finally:
            os.close(fd)
        slot = _Slot(name, path, mm)
        slot.words[MAGIC_WORD] = MAGIC
        return slot

    def _reap(self) -> None:
        """Slots whose receiver died are retired: no release will ever come for them."""
        for slot in list(self.slots):
            attached = int(slot.words[ATTACHED])
            if attached:
                slot.named = False  # the receiver removed the name when it mapped the slot
                if not alive(attached):
                    self._retire(slot)

    def _retire(self, slot: _Slot) -> None:
        slot.words[RETIRED] = 1
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


def _rounded(nbytes: int) -> int:
    """A slot size for `nbytes`: in steps of an eighth of its power of two (>= 1 MiB), so sizes repeat."""
    step = max(1 << 20, 1 << max(0, nbytes.bit_length() - 4))
    return -(-nbytes // step) * step


def _receiver(slots: list[_Slot]) -> int:
    """The pid of the live process that maps these slots (0: none is known)."""
    return next((pid for s in slots if (pid := int(s.words[ATTACHED])) and alive(pid)), 0)
