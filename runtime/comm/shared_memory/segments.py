"""The shared-memory segments' format, which sender and receiver both read: their names in /dev/shm (the creator's
pid in each), the header words each side writes, the `Handle` that travels in a tensor's place, and `SegmentError`
for a handle that cannot become a tensor. Also `sweep`, which removes the names nobody will map, and the helpers both
sides use."""

from __future__ import annotations

import contextlib
import os
import re
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from sagellm.common.errors import Lost
from sagellm.common.processes import alive  # (the sender and receiver import it from here)

if TYPE_CHECKING:
    import torch

SHM_DIR = "/dev/shm"
PREFIX = "sagellm-kv-"  # every segment we create: sagellm-kv-{creator pid}-{serial}-{random}
SEGMENT_NAME = re.compile(r"sagellm-kv-(\d+)-\d+-[0-9a-f]{8}")
# A slot's header: int64 words before its payload, each written by one side only. The sender's: MAGIC_WORD, FILL (which
# content the payload holds), SENT (handles sent), HEIR (the receiver it left the name to when it closed), RETIRED (it
# gave the slot up). The receiver's: RELEASED (handles whose tensors are gone), ATTACHED (its pid, once mapped).
HEADER = 64
MAGIC_WORD, FILL, SENT, RELEASED, ATTACHED, HEIR, RETIRED = range(7)
MAGIC = 0x3156_4B4D_4C4C_4753  # b"SGLLMKV1"


class SegmentError(Lost, ValueError):  # ValueError: as WireError, a message that cannot be decoded
    """A handle the receiver cannot turn into a tensor: the segment is gone, refilled, or smaller than it says."""


class Handle(msgspec.Struct, array_like=True):
    """What travels in place of a tensor's bytes."""

    segment: str  # the slot's name in /dev/shm
    fill: int  # which filling of the slot holds the tensor
    offset: int  # bytes into the slot's payload
    dtype: str  # torch dtype name without "torch."
    shape: list[int]


def sweep(directory: str = SHM_DIR) -> list[str]:
    """Removes the segments that nobody will map: their creator is dead and so is the receiver it left them to (a
    crash of both, or of a sender before it could close). Returns their names."""
    removed = []
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        match = SEGMENT_NAME.fullmatch(name)
        if match is None or alive(int(match[1])):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as file:
                words = np.frombuffer(file.read(HEADER).ljust(HEADER, b"\0"), dtype=np.int64)
        except OSError:
            continue  # mapped (and removed) by its receiver meanwhile
        if not (words[HEIR] and alive(int(words[HEIR]))):
            unlink_path(path)
            removed.append(name)
    return removed


def unlink_path(path: str) -> None:
    """Removes a segment's name; one already gone (the other side or a sweep removed it) is no error."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def tensor_over(array: np.ndarray, dtype: torch.dtype, shape: list[int] | torch.Size) -> torch.Tensor:
    """A tensor of `dtype` and `shape` over `array`'s bytes, without a copy."""
    import torch

    if array.nbytes == 0:
        return torch.empty(list(shape), dtype=dtype)
    return torch.from_numpy(array).view(dtype).view(list(shape))
