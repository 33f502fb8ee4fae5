"""Collectives between the ranks of one host through a shared memory segment, for the CPU: what gloo does over
loopback TCP in ~1 ms takes ~10 us here, and a decode step of a tensor parallel engine makes two per layer.

The segment is a memfd: rank 0 creates it before it starts the other ranks and passes the descriptor (`pass_fds`),
so it has no name in /dev/shm and goes away with the last process that maps it; nothing can leak.

    header   per rank, one cache line each: ARRIVED (collectives it has written its part of), LEFT (collectives it
             has finished reading), PID
    buffers  2 parities x ranks x capacity bytes: collective k uses parity k % 2

A collective: wait until every rank has LEFT collective k - 2 (the buffers of this parity are free again), write this
rank's part into its buffer, publish ARRIVED = k, wait until every rank (or the source) has ARRIVED at k, read, then
publish LEFT = k. Every rank reads the parts in rank order, so all get bit-identical sums. Stores become visible in
program order on x86 (TSO), which is what lets a counter published after the data vouch for it; on other machines
the communicator keeps its process group (`supported()`).

A waiting rank spins briefly, then yields, then sleeps in growing steps up to a few milliseconds (an idle engine's
ranks wait for the next step at no cost), checking the other ranks are alive: a rank that is gone ends the wait with
`CollectiveError`, never a hang."""

from __future__ import annotations

import math
import mmap
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sagellm.common.errors import Lost

LINE = 8  # int64 words per rank in the header: one 64-byte cache line each
_ARRIVED, _LEFT, _PID = 0, 1, 2
SPINS = 2000  # busy checks before yielding the core
MAX_SLEEP_S = 0.005
LIVENESS_EVERY_S = 0.1


class PeerGoneError(Lost, RuntimeError):
    """A rank the collective waits for has exited."""


def supported() -> bool:
    """Whether this machine orders stores as the protocol needs (x86's TSO) and has memfd."""
    return platform.machine().lower() in ("x86_64", "amd64") and hasattr(os, "memfd_create")


def create_segment(world_size: int, capacity: int) -> int:
    """A memfd sized for `world_size` ranks of `capacity` bytes each (rank 0, before starting the others); the
    descriptor is inheritable, for `pass_fds`."""
    fd = os.memfd_create("sagellm-collectives", 0)
    os.ftruncate(fd, _size(world_size, _aligned(capacity)))
    return fd


class SharedCollectives:
    def __init__(self, fd: int, rank: int, world_size: int, capacity: int) -> None:
        capacity = _aligned(capacity)
        self.rank, self.world_size, self.capacity = rank, world_size, capacity
        self._mm = mmap.mmap(fd, _size(world_size, capacity))
        self._words = np.frombuffer(self._mm, dtype=np.int64, count=world_size * LINE)
        self._words[rank * LINE + _PID] = os.getpid()
        header = world_size * LINE * 8
        whole = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._buffers = [
            [whole[header + (p * world_size + r) * capacity :][:capacity] for r in range(world_size)] for p in (0, 1)
        ]
        self._count = 0

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.capacity

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(tensor)
        tensor.copy_(parts[0])
        for part in parts[1:]:
            tensor.add_(part)
        self._leave()
        return tensor

    def all_gather(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's [..., sizes[r]] joined along the last dimension (slices may differ in size)."""
        lead = tensor.shape[:-1]
        parts = self._exchange(tensor, shapes=[(*lead, size) for size in sizes])
        joined = torch.cat(parts, dim=-1)
        self._leave()
        return joined

    def broadcast_bytes(self, data: bytes | None, src: int) -> bytes | int:
        """`src`'s bytes on every rank; when they do not fit, their length (the caller sends them another way)."""
        parity = self._arrive_prepare()
        buffer = self._buffers[parity][src]
        if self.rank == src:
            length = len(data)
            buffer[:8].view(torch.int64)[0] = length
            if 8 + length <= self.capacity:
                buffer[8 : 8 + length].numpy()[:] = np.frombuffer(data, dtype=np.uint8)
            self._publish()
            self._leave()
            return data if 8 + length <= self.capacity else length
        self._publish()
        self._wait_arrived([src])
        length = int(buffer[:8].view(torch.int64)[0])
        received = buffer[8 : 8 + length].numpy().tobytes() if 8 + length <= self.capacity else length
        self._leave()
        return received

    def close(self) -> None:
        self._buffers = []
        self._words = None
        self._mm.close()

    # -- the protocol -------------------------------------------------------------------------------------------------
    def _exchange(self, tensor: torch.Tensor, shapes: list[tuple[int, ...]] | None = None) -> list[torch.Tensor]:
        """Writes this rank's `tensor`, waits for every rank's, and returns views of all parts in rank order."""
        parity = self._arrive_prepare()
        nbytes = tensor.numel() * tensor.element_size()
        mine = self._buffers[parity][self.rank][:nbytes].view(tensor.dtype).view(tensor.shape)
        mine.copy_(tensor)
        self._publish()
        self._wait_arrived(range(self.world_size))
        shapes = shapes or [tuple(tensor.shape)] * self.world_size
        return [
            self._buffers[parity][r][: math.prod(shape) * tensor.element_size()].view(tensor.dtype).view(shape)
            for r, shape in enumerate(shapes)
        ]

    def _arrive_prepare(self) -> int:
        """The parity of the next collective, once every rank has left the one before the last."""
        self._count += 1
        earlier = self._count - 2
        if earlier > 0:
            self._wait(lambda: all(self._words[r * LINE + _LEFT] >= earlier for r in range(self.world_size)))
        return self._count % 2

    def _publish(self) -> None:
        self._words[self.rank * LINE + _ARRIVED] = self._count

    def _wait_arrived(self, ranks) -> None:
        count = self._count
        self._wait(lambda: all(self._words[r * LINE + _ARRIVED] >= count for r in ranks))

    def _leave(self) -> None:
        self._words[self.rank * LINE + _LEFT] = self._count

    def _wait(self, done) -> None:
        for _ in range(SPINS):
            if done():
                return
        sleep, checked = 0.0, time.monotonic()
        while not done():
            if sleep == 0.0:
                os.sched_yield()
                sleep = 1e-5
            else:
                time.sleep(sleep)
                sleep = min(sleep * 2, MAX_SLEEP_S)
            if time.monotonic() - checked > LIVENESS_EVERY_S:
                self._check_peers()
                checked = time.monotonic()

    def _check_peers(self) -> None:
        for rank in range(self.world_size):
            pid = int(self._words[rank * LINE + _PID])
            if rank != self.rank and pid and not _running(pid):
                raise PeerGoneError(f"rank {rank} (pid {pid}) has exited")


def _size(world_size: int, capacity: int) -> int:
    return world_size * LINE * 8 + 2 * world_size * capacity


def _aligned(capacity: int) -> int:
    return -(-capacity // 64) * 64  # every buffer starts on a cache line (and an int64 length fits its start)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead child its parent has not reaped yet still has a pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
