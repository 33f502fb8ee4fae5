"""The receiving side: a process's `Mappings` of the slots it was sent handles to. A slot is mapped the first time a
handle names it and its name removed at once (from then on a crash leaks nothing); a received tensor views the
mapping, and when its last view dies the slot is counted released, for the sender to fill again."""

from __future__ import annotations

import math
import mmap
import os
import threading
import weakref
from typing import TYPE_CHECKING

import numpy as np

from sagellm.runtime.comm.shared_memory.segments import (
    ATTACHED,
    FILL,
    HEADER,
    MAGIC,
    MAGIC_WORD,
    RELEASED,
    RETIRED,
    SEGMENT_NAME,
    SENT,
    SHM_DIR,
    Handle,
    SegmentError,
    alive,
    tensor_over,
    unlink_path,
)

if TYPE_CHECKING:
    import torch


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
            if segment.words[FILL] != handle.fill:
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
        return tensor_over(array, dtype, handle.shape)

    def _map(self, name: str) -> _Mapped:
        match = SEGMENT_NAME.fullmatch(name)
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
        if segment.words[MAGIC_WORD] != MAGIC:
            raise SegmentError(f"{name} is not a sageLLM shared-memory segment (no header)")
        unlink_path(path)  # mapped: the name is not needed any more, and a crash from now on leaks nothing
        segment.words[ATTACHED] = os.getpid()
        self.segments[name] = segment
        return segment

    def _forget(self) -> None:
        """Drops the mappings no handle will name again: retired by their sender, or their sender is dead (once
        nothing sent in them waits to be received). Each is unmapped when its last tensor goes."""
        for name, segment in list(self.segments.items()):
            idle = segment.words[SENT] == segment.words[RELEASED]
            if idle and (segment.words[RETIRED] or not alive(segment.owner)):
                del self.segments[name]

    def _release(self, segment: _Mapped) -> None:
        with self._lock:
            segment.words[RELEASED] += 1
