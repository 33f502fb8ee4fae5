"""The collectives between two real processes: this test is rank 0, a subprocess rank 1, over gloo on 127.0.0.1 and
through a shared memory segment (a memfd passed down); a rank gone ends a wait with an error; each hardware
backend's library is refused with its reason where this machine lacks it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sagellm.backends.base import HardwareBackend
from sagellm.backends.registry import BACKENDS
from sagellm.runtime.comm.collectives import (
    CollectiveError,
    CollectivesUnavailableError,
    Communicator,
    library_problem,
    open_store,
)
from sagellm.runtime.comm.shared_collectives import PeerGoneError, SharedCollectives, create_segment

RANK_1 = """
import sys, torch
from sagellm.runtime.comm.collectives import Communicator, GroupAddress, open_store
store = open_store(2, GroupAddress("127.0.0.1", int(sys.argv[1])))
comm = Communicator(1, 2, store)
comm.connect()
comm.all_reduce(x := torch.full((3,), 2.0))
assert x.tolist() == [3.0, 3.0, 3.0]
comm.all_gather(torch.full((2, 1), 7.0), [3, 1])
assert comm.broadcast_bytes(None) == b"step inputs"
comm.send(torch.arange(4.0), 0)
comm.recv(y := torch.empty(2), 0)
assert y.tolist() == [8.0, 9.0]
assert comm.broadcast_bytes(None) == b""
comm.close()
"""


def test_two_processes_reduce_gather_broadcast_and_exchange():
    store = open_store(2)
    rank1 = subprocess.Popen([sys.executable, "-c", RANK_1, str(store.port)])
    try:
        comm = Communicator(0, 2, store)
        comm.connect()
        assert comm.all_reduce(torch.ones(3)).tolist() == [3.0, 3.0, 3.0]
        gathered = comm.all_gather(torch.arange(6.0).view(2, 3), [3, 1])  # uneven slices: 3 + 1 columns
        assert gathered.tolist() == [[0.0, 1.0, 2.0, 7.0], [3.0, 4.0, 5.0, 7.0]]
        assert comm.broadcast_bytes(b"step inputs") == b"step inputs"
        assert comm.recv(torch.empty(4), 1).tolist() == [0.0, 1.0, 2.0, 3.0]
        comm.send(torch.tensor([8.0, 9.0]), 1)
        assert comm.broadcast_bytes(b"") == b""
        comm.close()
        assert rank1.wait(60) == 0
    finally:
        rank1.kill()


def test_a_gone_peer_is_a_collective_error_not_a_hang():
    store = open_store(2)
    rank1 = subprocess.Popen([sys.executable, "-c", RANK_1.split("comm.all_reduce")[0], str(store.port)])
    comm = Communicator(0, 2, store, timeout_s=30)
    comm.connect()
    rank1.wait(60)  # connected, then exited
    with pytest.raises(CollectiveError):
        comm.all_reduce(torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS.items().values(), ids=lambda b: b.name)
def test_every_backend_names_its_library_and_an_absent_one_says_why(backend: type[HardwareBackend]):
    problem = library_problem(backend.collective_library)
    if backend.collective_library == "gloo":
        assert problem is None
    elif backend.collective_library == "nccl" and not torch.distributed.is_nccl_available():
        assert "this torch build has no NCCL" in problem
    with pytest.raises(CollectivesUnavailableError, match="no collective library 'mpi'"):
        Communicator(0, 1, None, library="mpi")
    if problem:
        with pytest.raises(CollectivesUnavailableError, match=backend.collective_library):
            Communicator(0, 1, None, library=backend.collective_library)


SHARED_RANK_1 = """
import sys, torch
from sagellm.runtime.comm.shared_collectives import SharedCollectives
me = SharedCollectives(int(sys.argv[1]), 1, 2, 4096)
for step in range(200):  # many rounds: both parities reused, never a stale read
    x = torch.full((3,), float(step))
    me.all_reduce(x)
    assert x.tolist() == [2.0 * step + 1] * 3, (step, x)
assert me.all_gather(torch.full((2, 1), 7.0), [3, 1]).tolist() == [[0.0, 1.0, 2.0, 7.0], [3.0, 4.0, 5.0, 7.0]]
assert me.broadcast_bytes(None, 0) == b"step inputs"
assert me.broadcast_bytes(None, 0) == 5000  # too big for the segment: its length, for the caller to fetch otherwise
"""


def test_shared_memory_collectives_between_two_processes():
    fd = create_segment(2, 4096)
    rank1 = subprocess.Popen([sys.executable, "-c", SHARED_RANK_1, str(fd)], pass_fds=(fd,))
    me = SharedCollectives(fd, 0, 2, 4096)
    try:
        for step in range(200):
            assert me.all_reduce(torch.full((3,), float(step + 1))).tolist() == [2.0 * step + 1] * 3
        assert me.all_gather(torch.arange(6.0).view(2, 3), [3, 1]).tolist() == [
            [0.0, 1.0, 2.0, 7.0],
            [3.0, 4.0, 5.0, 7.0],
        ]
        assert me.broadcast_bytes(b"step inputs", 0) == b"step inputs"
        assert me.broadcast_bytes(b"x" * 5000, 0) == 5000
        assert rank1.wait(60) == 0
    finally:
        rank1.kill()
        me.close()


def test_a_rank_gone_from_shared_memory_ends_the_wait():
    fd = create_segment(2, 4096)
    rank1 = subprocess.Popen([sys.executable, "-c", SHARED_RANK_1.split("for step")[0], str(fd)], pass_fds=(fd,))
    me = SharedCollectives(fd, 0, 2, 4096)
    rank1.wait(60)  # it wrote its pid and exited: a zombie until reaped, which counts as gone
    with pytest.raises(PeerGoneError, match="rank 1"):
        me.all_reduce(torch.ones(3))
    me.close()
