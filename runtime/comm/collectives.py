"""Collectives between the ranks of one model (tensor and pipeline parallel groups): one face over torch's process
groups, whichever library the hardware backend's devices talk through.

    all_reduce(t)            every rank's t summed, on every rank (row-parallel linears)
    all_gather(t, sizes)     every rank's slice of the last dimension, joined in rank order (vocab-parallel logits)
    broadcast(t, src)        src's t on every rank
    broadcast_bytes(b, src)  src's bytes on every rank (the step's inputs, sent by the scheduler's rank)
    send(t, dst) / recv(t, src)  point to point (pipeline stages)

A group is made without torch.distributed's process-global default group (`init_process_group`): the process group
object is built straight from a TCP store, so one process may hold several groups (two engines, each with its own
ranks) and nothing global is left behind. Rank 0 hosts the store on 127.0.0.1 (port 0: the OS picks one) and the
other ranks connect to its address.

Which library: the backend class names it (`HardwareBackend.collective_backend`: gloo on the CPU, nccl on CUDA and
ROCm, hccl on Ascend, cncl on Cambricon); a library this torch build or machine lacks fails at once with the reason,
never at the first collective."""

from __future__ import annotations

import datetime
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sagellm.common.errors import Lost, Unavailable
from sagellm.runtime.comm.shared_collectives import PeerGoneError, SharedCollectives

DEFAULT_TIMEOUT_S = 300.0  # a collective no peer answers for this long fails (a lost rank), rather than hanging


class CollectivesUnavailableError(Unavailable, RuntimeError):
    """The collective library a backend needs is not in this torch build or on this machine."""


@dataclass(frozen=True)
class GroupAddress:
    """Where the ranks of a group meet: rank 0's TCP store."""

    host: str
    port: int


def _gloo(store: Any, rank: int, world_size: int, timeout: datetime.timedelta) -> Any:
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def _nccl(store: Any, rank: int, world_size: int, timeout: datetime.timedelta) -> Any:
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


def _vendor(library: str, class_path: str) -> Callable[..., Any]:
    """A vendor library's process group, found in its torch plug-in (`_PLUGINS`)."""

    def make(store: Any, rank: int, world_size: int, timeout: datetime.timedelta) -> Any:
        module = _PLUGINS[library]
        group_class: Any = importlib.import_module(module)
        for part in class_path.split("."):
            group_class = getattr(group_class, part, None)
            if group_class is None:
                raise CollectivesUnavailableError(f"{library}: {module} has no {class_path}")
        return group_class(store, rank, world_size, timeout)

    return make


_PLUGINS = {"hccl": "torch_npu", "cncl": "torch_mlu"}  # the vendor library -> its torch plug-in
_LIBRARIES: dict[str, Callable[..., Any]] = {
    "gloo": _gloo,
    "nccl": _nccl,
    "hccl": _vendor("hccl", "_C._distributed_c10d.ProcessGroupHCCL"),
    "cncl": _vendor("cncl", "_C._distributed_c10d.ProcessGroupCNCL"),
}


def library_problem(library: str) -> str | None:
    """Why `library` cannot connect ranks on this machine, or None when it can (checked before any rank starts)."""
    if library not in _LIBRARIES:
        return f"no collective library {library!r}; have {', '.join(_LIBRARIES)}"
    if library == "nccl" and not dist.is_nccl_available():
        return "nccl: this torch build has no NCCL (a CPU build); tensor parallelism on GPUs needs a CUDA build"
    plugin = _PLUGINS.get(library)
    if plugin and importlib.util.find_spec(plugin) is None:
        return f"{library}: needs the {plugin} package (the vendor's torch plug-in), which is not installed"
    return None


class CollectiveError(Lost, RuntimeError):
    """A collective failed: a rank of the group is gone or stopped answering."""


def open_store(world_size: int, address: GroupAddress | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """The group's meeting point: hosted here when `address` is None (rank 0; port 0 lets the OS pick one), else
    rank 0's, connected to. Ranks also leave notes in it (a rank is ready, or why it failed)."""
    host, port = (address.host, address.port) if address else ("127.0.0.1", 0)
    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore(host, port, world_size, address is None, timeout=timeout, wait_for_workers=False)


class Communicator:
    """One rank's end of a group. Every rank must call the same collectives in the same order.

    Made in two steps so a rank can prepare its weights before it waits for the others: the communicator exists
    (and can be bound into a lowered graph) at once; `connect()` is the rendezvous, once every rank is ready."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        store: Any,
        *,
        library: str = "gloo",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        shared: SharedCollectives | None = None,
    ) -> None:
        """`shared`: the ranks' segment on this host (CPU tensors that fit it go through it instead of `library`)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a group of {world_size}")
        problem = library_problem(library)
        if problem:
            raise CollectivesUnavailableError(problem)
        self.rank, self.world_size, self.library, self.store = rank, world_size, library, store
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._group: Any = None
        self.shared = shared

    def connect(self) -> None:
        """Waits for every rank to connect (each calls this) and opens the library's process group."""
        self._group = _LIBRARIES[self.library](self.store, self.rank, self.world_size, self._timeout)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place."""
        if self._shares(tensor):
            return self._local(self.shared.all_reduce, tensor)
        self._run(self._group.allreduce, [tensor])
        return tensor

    def all_gather(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's [..., sizes[r]] slice joined along the last dimension in rank order. Slices may differ in
        size (an uneven split): each is padded to the largest for the library and trimmed after."""
        if self._shares(tensor) and self.shared.fits(max(sizes) * tensor[..., :1].numel() * tensor.element_size()):
            return self._local(self.shared.all_gather, tensor.contiguous(), sizes)
        widest = max(sizes)
        if tensor.shape[-1] < widest:
            tensor = torch.nn.functional.pad(tensor, (0, widest - tensor.shape[-1]))
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._run(self._group.allgather, [parts], [tensor.contiguous()])
        return torch.cat([part[..., :size] for part, size in zip(parts, sizes)], dim=-1)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`src`'s tensor, written into `tensor` on every other rank (same shape and dtype on all)."""
        self._run(self._group.broadcast, tensor, src)
        return tensor

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """`src`'s bytes on every rank (the others pass None): the length, then the bytes. Waiting for them has no
        time limit when the ranks share memory (a rank waits for its engine's next step, however idle)."""
        if self.shared is not None:
            received = self._local(self.shared.broadcast_bytes, data, src)
            if isinstance(received, bytes):
                return received
            length = torch.tensor([received], dtype=torch.int64)  # too big for the segment: through the library
        else:
            length = torch.tensor([len(data) if self.rank == src else 0], dtype=torch.int64)
            self.broadcast(length, src)
        if not int(length):
            return b""
        if self.rank == src:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            buffer = torch.empty(int(length), dtype=torch.uint8)
        return self.broadcast(buffer, src).numpy().tobytes()

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._run(self._group.send, [tensor.contiguous()], dst, 0)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receives into `tensor`, whose shape and dtype the sender's match."""
        self._run(self._group.recv, [tensor], src, 0)
        return tensor

    def close(self) -> None:
        """Shuts the process group down (a group left to the interpreter's exit may abort it)."""
        if self.shared is not None:
            self.shared.close()
            self.shared = None
        if self._group is not None:
            self._group.shutdown()
            self._group = None

    def _shares(self, tensor: torch.Tensor) -> bool:
        return (
            self.shared is not None
            and tensor.device.type == "cpu"
            and self.shared.fits(tensor.numel() * tensor.element_size())
        )

    @staticmethod
    def _local(operation: Callable[..., Any], *args: Any) -> Any:
        try:
            return operation(*args)
        except PeerGoneError as error:
            raise CollectiveError(str(error)) from error

    @staticmethod
    def _run(operation: Callable[..., Any], *args: Any) -> None:
        try:
            operation(*args).wait()
        except RuntimeError as error:  # gloo and nccl report a lost peer or a timeout as a RuntimeError
            raise CollectiveError(str(error)) from error
