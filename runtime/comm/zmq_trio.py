"""ZeroMQ sockets driven from trio tasks: the links of a pipeline graph whose nodes run in several processes.

pyzmq has no trio integration, so a socket is used non-blocking and a task that must wait sleeps on the socket's
`zmq.FD` with `trio.lowlevel.wait_readable`. That FD is edge-triggered: it fires when the socket's events *may* have
changed, and any call on the socket, a send included, can consume the edge meant for a waiting receive. So every
operation is tried first, a waiter re-checks `zmq.EVENTS` before sleeping again, and after each send or receive every
waiting task whose event is then ready is woken (`_check_events`). Trio lets one task wait on an FD, so one waiter
sleeps on it and the others park until it wakes.

Edges are PUSH → PULL: the downstream node binds a PULL (all its in-edges merge there, as a node's inputs merge into
one stream), each upstream connects a PUSH. HWMs bound the messages queued on each side, so a slow consumer makes its
producers wait in `send` (backpressure) instead of growing memory; LINGER bounds how long closing waits for unsent
messages, so shutdown never hangs. A PUSH connected with `shared_memory=True` to a peer on this host (ipc://, or
tcp:// on loopback) sends tensors through shared memory (`comm.shared_memory`): only a handle enters ZeroMQ. The
control channel between the process that runs a graph and its workers is ROUTER ← DEALER: one port the parent binds,
both directions, which is all a worker on another host must find.
Every helper takes the run's `keys` (`curve.RunKeys`) when the run is secure: bound sockets are then CURVE servers and
connected ones CURVE clients, so links are encrypted and only processes holding the run's key can connect.

Use from a trio task (one `zmq.Context` per process, never shared across fork: children are spawned):

    ctx = zmq.Context()
    pull, endpoint = bind_pull(ctx, "ipc", "decode")       # give `endpoint` to the upstream process
    with pull:
        item = await pull.receive()

and in a child process's main: `trio.run(main)` where `main` does `with connect_push(ctx, endpoint) as push:
await push.send(Ready(node=..., pid=os.getpid()))`, then the child's work; `ctx.term()` after `trio.run` returns."""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import trio
import zmq

from sagellm.common.errors import InvalidInput
from sagellm.common.processes import alive
from sagellm.runtime.comm import wire
from sagellm.runtime.comm.curve import RunKeys
from sagellm.runtime.comm.shared_memory import Link, link_to
from sagellm.runtime.comm.wire import Heartbeat, Ready, WireMessage

DEFAULT_HWM = 64  # messages queued per socket (each side) before `send` waits
DEFAULT_LINGER_MS = 1000  # how long closing may wait to flush unsent messages
_IPC_PATH_MAX = 107  # sun_path of a Unix socket, minus its terminating NUL


class AddressError(InvalidInput, OSError):  # OSError: what socket calls raise, and what callers catch
    """An address this process cannot listen at (in use, not one of this host's), or a host it has no route to."""


class TrioSocket:
    """A ZeroMQ socket whose sends and receives are trio checkpoints that wait without blocking the event loop.

    Any number of tasks may send or receive concurrently; each multipart message is sent and received whole.
    Cancelling a waiting `send` or `receive` loses nothing: the message was not taken."""

    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket
        self.link: Link | None = None  # where tensors go when the peer shares this host's memory
        self._fd: int = socket.getsockopt(zmq.FD)
        self._fd_waiter: trio.CancelScope | None = None  # the one waiting task that sleeps on the FD
        self._fd_waiter_event = 0  # and what it waits for
        # The other waiting tasks, by the event they wait for; they exist only while there is an FD waiter.
        self._parked = {zmq.POLLIN: trio.lowlevel.ParkingLot(), zmq.POLLOUT: trio.lowlevel.ParkingLot()}
        self._closed = False

    async def send(self, msg: WireMessage) -> None:
        """Sends an item or a control message; waits while the peer's queue is full (the HWM) or no peer is up."""
        await self.send_frames(wire.encode(msg, self.link))

    async def receive(self) -> WireMessage:
        """The next message; its tensors alias the received frames (see `wire`). Raises `wire.WireError` on a
        malformed message (which is consumed)."""
        return wire.decode(await self.receive_frames())

    async def send_frames(self, frames: Sequence[bytes | memoryview | zmq.Frame]) -> None:
        """Sends one multipart message without copying its buffers (do not write into them afterwards)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check_open()
            try:
                # ZeroMQ queues a multipart message atomically: only the first part can meet the HWM.
                self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                await self._wait_for(zmq.POLLOUT)
            else:
                self._after_operation()
                await trio.lowlevel.cancel_shielded_checkpoint()  # done: yield, but a cancel must not lose it
                return

    def send_now(self, frames: Sequence[bytes | memoryview | zmq.Frame]) -> bool:
        """Sends one multipart message if the socket takes it at once, without waiting (a task that cannot await);
        False when it did not (a full queue, a closed socket): the message is dropped."""
        if self._closed:
            return False
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            return False
        self._after_operation()  # the send may have consumed the FD edge a waiting receive sleeps on
        return True

    async def receive_frames(self) -> list[zmq.Frame]:
        """The next multipart message as frames that own their memory (received with copy=False)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check_open()
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                await self._wait_for(zmq.POLLIN)
            else:
                self._after_operation()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return frames

    def close(self) -> None:
        """Closes the socket (idempotent); tasks waiting on it get `trio.ClosedResourceError`. Unsent messages get
        LINGER to leave; tensors sent through shared memory get the link's own linger."""
        if self._closed:
            return
        self._closed = True
        if self.link is not None:
            self.link.close()
        try:
            trio.lowlevel.notify_closing(self._fd)
            for lot in self._parked.values():
                lot.unpark_all()
        except RuntimeError:
            pass  # outside trio.run: no task can be waiting
        self.socket.close()

    def __enter__(self) -> TrioSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _after_operation(self) -> None:
        """A send or receive may have consumed the FD's edge: tasks waiting for what is now ready must hear of it."""
        if self._fd_waiter is not None:
            self._check_events()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the socket was closed")

    async def _wait_for(self, event: int) -> None:
        """Until the socket can do `event` (zmq.POLLIN or zmq.POLLOUT)."""
        while True:
            self._check_open()
            if self._check_events() & event:
                return
            if self._fd_waiter is not None:
                await self._parked[event].park()
                continue
            self._fd_waiter_event = event
            try:
                with trio.CancelScope() as self._fd_waiter:
                    await trio.lowlevel.wait_readable(self._fd)
            finally:
                self._fd_waiter = None
                for lot in self._parked.values():
                    lot.unpark_all()  # the FD fired or its waiter left: the others re-check, one takes the FD

    def _check_events(self) -> int:
        """The socket's events now. Reading them (or sending, or receiving) may consume the FD edge that another
        task sleeps on, so every waiting task whose event is ready is woken here."""
        events = self.socket.getsockopt(zmq.EVENTS)
        if self._fd_waiter is not None and events & self._fd_waiter_event:
            self._fd_waiter.cancel()
        for flag, lot in self._parked.items():
            if events & flag:
                lot.unpark_all()
        return events


def address(transport: str, name: str, host: str = "127.0.0.1", port: int | None = None) -> str:
    """Where to bind a socket for node `name`: an ipc:// path unique in the run's temp dir (one host), or
    tcp:// on `host` and `port` (default `*`: the OS picks a free one; read the real endpoint back after binding)."""
    if transport == "tcp":
        return f"tcp://{host}:{port or '*'}"
    if transport != "ipc":
        raise InvalidInput(f"unknown transport {transport!r}; use 'ipc' (one host) or 'tcp' (across hosts)")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40]
    path = os.path.join(_ipc_dir(), f"{stem}-{os.getpid()}-{next(_ipc_serial)}")
    if len(path) > _IPC_PATH_MAX:
        raise InvalidInput(f"ipc path {path!r} is longer than {_IPC_PATH_MAX} characters; set TMPDIR to a short path")
    return "ipc://" + path


def bind_pull(
    ctx: zmq.Context,
    transport: str,
    name: str,
    *,
    hwm: int = DEFAULT_HWM,
    host: str = "127.0.0.1",
    port: int | None = None,
    keys: RunKeys | None = None,
) -> tuple[TrioSocket, str]:
    """A PULL socket bound for node `name`, and the endpoint its upstream peers connect to (as bound: see
    `with_host` when the host is a wildcard)."""
    return _bind(ctx, zmq.PULL, address(transport, name, host, port), name, hwm, keys)


def bind_router(
    ctx: zmq.Context,
    transport: str,
    name: str,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    keys: RunKeys | None = None,
) -> tuple[TrioSocket, str]:
    """A ROUTER socket bound for `name` (the parent's control socket): received messages start with the sender's
    routing id, and a send starts with the recipient's."""
    return _bind(ctx, zmq.ROUTER, address(transport, name, host, port), name, DEFAULT_HWM, keys)


def connect_push(
    ctx: zmq.Context,
    endpoint: str,
    *,
    hwm: int = DEFAULT_HWM,
    keys: RunKeys | None = None,
    shared_memory: bool = False,
) -> TrioSocket:
    """A PUSH socket connected to a peer's PULL. Connecting never waits: sends queue (up to the HWM) until the peer
    is up (and, with `keys`, has accepted the handshake). With `shared_memory`, tensors to a peer on this host go
    through shared memory."""
    sock = _connect(ctx, zmq.PUSH, endpoint, hwm, keys)
    sock.link = link_to(endpoint) if shared_memory else None
    return sock


def connect_dealer(ctx: zmq.Context, endpoint: str, *, keys: RunKeys | None = None) -> TrioSocket:
    """A DEALER socket connected to a ROUTER (a worker's end of the control channel); retries until the peer is up
    (with `keys`: until it accepts the handshake; one that never does looks like a peer that is not up)."""
    return _connect(ctx, zmq.DEALER, endpoint, DEFAULT_HWM, keys)


def with_host(endpoint: str, host: str) -> str:
    """A bound tcp endpoint as others reach it: `tcp://0.0.0.0:5555` with host `node7` is `tcp://node7:5555`
    (ipc endpoints are returned unchanged)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    return f"tcp://{host}:{endpoint.rpartition(':')[2]}"


def local_endpoint(bound: str) -> str:
    """A bound endpoint as a process on this host reaches it: one bound on every interface (`tcp://0.0.0.0:PORT`)
    at loopback, any other as bound."""
    return with_host(bound, "127.0.0.1") if bound.startswith("tcp://0.0.0.0:") else bound


def host_toward(endpoint: str) -> str:
    """This host's IPv4 address on the route to `endpoint`'s host: an address that host can reach us at. Nothing is
    sent (a UDP socket's `connect` only picks the route)."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        family, kind, _, _, peer = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind) as probe:
            probe.connect(peer)
            return probe.getsockname()[0]
    except (OSError, ValueError) as error:
        raise AddressError(f"cannot find a route to {endpoint}: {error}") from None


def _bind(ctx: zmq.Context, kind: int, addr: str, name: str, hwm: int, keys: RunKeys | None) -> tuple[TrioSocket, str]:
    socket = _socket(ctx, kind, hwm)
    if keys is not None:
        keys.serve(socket)
    try:
        socket.bind(addr)
    except zmq.ZMQError as error:
        socket.close(linger=0)
        raise AddressError(f"cannot bind {addr} for {name!r}: {error}") from None
    return TrioSocket(socket), socket.getsockopt_string(zmq.LAST_ENDPOINT)


def _connect(ctx: zmq.Context, kind: int, endpoint: str, hwm: int, keys: RunKeys | None) -> TrioSocket:
    socket = _socket(ctx, kind, hwm)
    if keys is not None:
        keys.join(socket)
    socket.connect(endpoint)
    return TrioSocket(socket)


def _socket(ctx: zmq.Context, kind: int, hwm: int) -> zmq.Socket:
    if hwm < 1:
        raise ValueError(f"hwm must be >= 1 (0 would mean unbounded queues), got {hwm}")
    socket = ctx.socket(kind)
    socket.setsockopt(zmq.LINGER, DEFAULT_LINGER_MS)
    socket.setsockopt(zmq.SNDHWM, hwm)
    socket.setsockopt(zmq.RCVHWM, hwm)
    return socket


_ipc_serial = itertools.count()
IPC_DIR_ENV = "SAGELLM_IPC_DIR"  # the run's ipc directory, inherited by spawned children
IPC_DIR_NAME = re.compile(r"sagellm-(\d+)-\w+")  # sagellm-{its owner's pid}-{random}


def _ipc_dir() -> str:
    """The run's directory for ipc socket files: made by the first process that binds one (removed when it exits;
    see `reclaim_ipc_dirs` for one killed outright) and handed to the processes it spawns through the environment.
    Falls back to /tmp when TMPDIR is too long for socket paths."""
    path = os.environ.get(IPC_DIR_ENV)
    if path and os.path.isdir(path):
        return path
    parent = tempfile.gettempdir()
    if len(parent) > _IPC_PATH_MAX - 80:
        parent = "/tmp"
    reclaim_ipc_dirs(parent)
    path = tempfile.mkdtemp(prefix=f"sagellm-{os.getpid()}-", dir=parent)
    os.environ[IPC_DIR_ENV] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def reclaim_ipc_dirs(parent: str | None = None) -> list[str]:
    """Removes the ipc directories in `parent` (default: where this run's is) whose owner is dead, and returns them.
    A process killed outright (kill -9) cannot remove its own: its workers do as they exit with it
    (`common.parent_death`), and the next process to make one does, for a run that had none."""
    if parent is None:
        inherited = os.environ.get(IPC_DIR_ENV)
        parent = os.path.dirname(inherited) if inherited else tempfile.gettempdir()
    removed = []
    for name in os.listdir(parent) if os.path.isdir(parent) else ():
        owner = IPC_DIR_NAME.fullmatch(name)
        if owner is not None and not alive(int(owner[1])):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(os.path.join(parent, name))
    return removed


async def announce_ready(sock: TrioSocket, node: str, info: dict[str, Any] | None = None) -> None:
    """Tells the peer on `sock` that `node` is up (e.g. `info={"endpoint": ...}` for the PULL it bound)."""
    await sock.send(Ready(node=node, pid=os.getpid(), info=info or {}))


async def heartbeat_loop(
    sock: TrioSocket, node: str, interval: float, stats_fn: Callable[[], dict[str, dict[str, Any]]] = dict
) -> NoReturn:
    """Sends a Heartbeat with `stats_fn()` (per-instance stats) every `interval` seconds, until cancelled. Send it on
    a control socket of its own: on a data socket it would queue behind backpressured items."""
    while True:
        await sock.send(Heartbeat(node=node, time=time.time(), stats=stats_fn()))
        await trio.sleep(interval)
