"""This process's use of shared memory: its one arena (made on first use, its slots given up at exit) and its one set
of mappings, and which sockets may use them: a peer on this host, where /dev/shm is writable."""

from __future__ import annotations

import atexit
import functools
import os
import socket
from typing import TYPE_CHECKING

from sagellm.runtime.comm.shared_memory.receiver import Mappings
from sagellm.runtime.comm.shared_memory.segments import SHM_DIR, Handle
from sagellm.runtime.comm.shared_memory.sender import Arena, Link

if TYPE_CHECKING:
    import torch


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
