"""The KV-transfer benchmark (W7): one prompt's KV moved from a prefill worker to a decode worker, against memcpy.

The payload is a request's KV as `KVBlocks` carries it: [layers, 2, tokens, kv heads, head_dim], SmolLM2 and a
1,024-token prompt by default (47 MB in fp32). Each transfer is timed from the decode side asking for it (a `Request`)
until the KV sits copied in a preallocated destination, because a decode worker must copy what it receives into its
own paged cache. Paths, all in one run because the machine is shared and only side-by-side ratios hold:
- memcpy: `dst.copy_(src)` of the same bytes, the floor every path pays once;
- in-process: prefill and decode as trio tasks, the `PrefillDone` handed over a memory channel, then the copy;
- ipc / tcp: prefill in its own spawned OS process, the `PrefillDone` sent over ZeroMQ (ipc://, or tcp:// on
  127.0.0.1) with the KV as a zero-copy frame (`sagellm.runtime.comm`), then the copy;
- shm: the same over ipc://, the KV through shared memory (`sagellm.runtime.comm.shared_memory`): the prefill side
  copies it into a reused segment and sends a handle, the decode side copies out of its mapping of the segment;
- shm-zero-copy: the same, the KV already in shared memory (`Arena.empty`, as a prefill engine that gathers its KV
  straight into shared memory would hold it), so only the decode side's copy moves bytes.
Every path's destination is checked to equal the payload afterwards, so a path that moved nothing cannot look fast."""

from __future__ import annotations

import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import trio
import zmq
from tqdm import tqdm

from sagellm.benchmarks.errors import BenchmarkError
from sagellm.benchmarks.report import write_json_and_plot
from sagellm.common.errors import InvalidInput
from sagellm.runtime.comm import shared_memory, wire
from sagellm.runtime.comm.wire import End, Ready
from sagellm.runtime.comm.zmq_trio import TrioSocket, announce_ready, bind_pull, connect_push
from sagellm.runtime.pipeline.messages import KVBlocks, PrefillDone, Request

PATHS = ("memcpy", "in-process", "ipc", "tcp", "shm", "shm-zero-copy")
DESCRIPTIONS = {
    "memcpy": "dst.copy_(src) of the same bytes in the receiving process",
    "in-process": "trio tasks: PrefillDone over a memory channel, then the copy into the destination",
    "ipc": "separate processes: PrefillDone over ZeroMQ ipc:// (KV as a zero-copy frame), then the copy",
    "tcp": "separate processes: PrefillDone over ZeroMQ tcp://127.0.0.1 (KV as a zero-copy frame), then the copy",
    "shm": "separate processes: PrefillDone over ipc://, the KV copied into shared memory and sent as a handle, then "
    "the copy out of it",
    "shm-zero-copy": "separate processes: as shm, the KV already in shared memory (gathered there by prefill), so "
    "the copy out of it is the only one",
}
SEED = 0


@dataclass(frozen=True)
class KVShape:
    """One request's KV: [num_layers, 2 (k, v), num_tokens, num_kv_heads, head_dim]."""

    num_layers: int = 30  # SmolLM2-135M
    num_tokens: int = 1024
    num_kv_heads: int = 3
    head_dim: int = 64

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_tokens, self.num_kv_heads, self.head_dim)


@dataclass
class KVTransferConfig:
    shape: KVShape = field(default_factory=KVShape)
    dtype: str = "float32"
    repeats: int = 20
    warmup: int = 2
    paths: tuple[str, ...] = PATHS
    timeout_s: float = 120.0  # per path: a hung peer fails the run instead of stalling it
    progress: bool = True


@dataclass
class PathResult:
    path: str
    seconds: list[float]  # one per timed transfer

    def gbps(self, nbytes: int) -> float:
        return statistics.median(nbytes / s / 1e9 for s in self.seconds)


@dataclass
class KVTransferReport:
    config: KVTransferConfig
    nbytes: int
    machine: dict[str, object]
    results: list[PathResult]

    def row(self, path: str) -> dict[str, float]:
        result = next(r for r in self.results if r.path == path)
        memcpy = next((r for r in self.results if r.path == "memcpy"), None)
        gbps = result.gbps(self.nbytes)
        return {
            "gbps_median": gbps,
            "ms_median": 1000 * statistics.median(result.seconds),
            "ms_min": 1000 * min(result.seconds),
            "vs_memcpy": gbps / memcpy.gbps(self.nbytes) if memcpy else math.nan,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "W7 kv transfer",
            "shape": list(self.config.shape.dims),
            "dtype": self.config.dtype,
            "bytes": self.nbytes,
            "repeats": self.config.repeats,
            "warmup": self.config.warmup,
            "machine": self.machine,
            "results": [
                {"path": r.path, **self.row(r.path), "runs_ms": [1000 * s for s in r.seconds]} for r in self.results
            ],
            "definitions": DESCRIPTIONS
            | {"gbps": "payload bytes / seconds from the decode side's ask to the copy's end; median of repeats"},
        }


def kv_shape(model: str | Path | None, num_tokens: int) -> KVShape:
    """The KV shape of `model`'s config for a `num_tokens` prompt; SmolLM2-135M's without a model."""
    if model is None:
        return KVShape(num_tokens=num_tokens)
    from sagellm.runtime.models.loader import load_model

    config = load_model(model, load_tokenizer=False, load_weights=False).config
    return KVShape(config.num_layers, num_tokens, config.num_kv_heads, config.head_dim)


def run_kv_transfer(config: KVTransferConfig) -> KVTransferReport:
    """Every path in turn, `warmup` untimed then `repeats` timed transfers each, into one destination buffer."""
    unknown = set(config.paths) - set(PATHS)
    if unknown or config.repeats < 1 or config.warmup < 0:
        raise InvalidInput(f"paths must be among {', '.join(PATHS)} (got {sorted(unknown)}), repeats >= 1, warmup >= 0")
    src = _payload(config.shape.dims, config.dtype)  # [L, 2, T, H, D]
    dst = torch.empty_like(src)  # the decode side's cache, preallocated
    count = config.warmup + config.repeats
    results: list[PathResult] = []
    with tqdm(total=count * len(config.paths), unit="transfer", disable=not config.progress) as bar:
        for path in config.paths:
            bar.set_description(path)
            dst.zero_()
            if path == "memcpy":
                seconds = _memcpy(src, dst, count, bar.update)
            elif path == "in-process":
                seconds = trio.run(_in_process, src, dst, count, bar.update, config.timeout_s)
            else:
                seconds = trio.run(_across_processes, path, config, dst, count, bar.update)
            if not torch.equal(dst, src):
                raise BenchmarkError(f"{path}: the destination does not hold the payload after the transfers")
            results.append(PathResult(path, seconds[config.warmup :]))
    from sagellm.benchmarks.offline import machine_info

    return KVTransferReport(config, src.numel() * src.element_size(), machine_info(torch.get_num_threads()), results)


def _payload(dims: tuple[int, ...], dtype: str) -> torch.Tensor:
    """The KV both sides agree on (same seed), so the receiver can check what arrived."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(dims, generator=generator).to(getattr(torch, dtype))  # [L, 2, T, H, D]


class _Sends(Protocol):
    async def send(self, msg: Any) -> None: ...


class _Receives(Protocol):
    async def receive(self) -> Any: ...


async def _serve_kv(requests: _Receives, replies: _Sends, kv: torch.Tensor) -> None:
    """The prefill side: answers each Request with a PrefillDone carrying the KV, until End."""
    while not isinstance(request := await requests.receive(), End):
        done = PrefillDone(
            request_id=request.request_id,
            request=request,
            first_token=0,
            first_token_time=time.time(),
            kv=KVBlocks(num_tokens=kv.shape[2], data=kv),
        )
        await replies.send(done)


async def _fetch_kv(
    requests: _Sends, replies: _Receives, dst: torch.Tensor, count: int, progress: Callable[[int], object]
) -> list[float]:
    """The decode side: `count` transfers, each from the ask to the KV copied into `dst`; then End."""
    seconds = []
    for i in range(count):
        start = time.perf_counter()
        await requests.send(Request(request_id=f"kv-{i}"))
        done = await replies.receive()
        dst.copy_(done.kv.data)  # into the "paged cache"
        seconds.append(time.perf_counter() - start)
        del done  # free the received frame before the next one arrives
        progress(1)
    await requests.send(End(node="decode"))
    return seconds


def _memcpy(src: torch.Tensor, dst: torch.Tensor, count: int, progress: Callable[[int], object]) -> list[float]:
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - start)
        progress(1)
    return seconds


async def _in_process(
    kv: torch.Tensor, dst: torch.Tensor, count: int, progress: Callable[[int], object], timeout_s: float
) -> list[float]:
    send_requests, receive_requests = trio.open_memory_channel[Any](1)
    send_replies, receive_replies = trio.open_memory_channel[Any](1)
    with trio.fail_after(timeout_s):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_kv, receive_requests, send_replies, kv)
            return await _fetch_kv(send_requests, receive_replies, dst, count, progress)


async def _across_processes(
    path: str, config: KVTransferConfig, dst: torch.Tensor, count: int, progress: Callable[[int], object]
) -> list[float]:
    """Binds the decode side's PULL, spawns the prefill process, which binds its own PULL and reports it in Ready,
    then runs the transfers. The child exiting early fails the run at once."""
    transport = "tcp" if path == "tcp" else "ipc"
    ctx = zmq.Context()
    replies, endpoint = bind_pull(ctx, transport, "kv-decode", hwm=1)
    args = (path, endpoint, config.shape.dims, config.dtype)
    process = multiprocessing.get_context("spawn").Process(target=prefill_process, args=args, daemon=True)
    process.start()
    try:
        with replies, trio.fail_after(config.timeout_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_fail_if_exits, process)
                ready = await replies.receive()
                if not isinstance(ready, Ready):
                    raise BenchmarkError(f"{transport}: expected Ready from the prefill process, got {ready!r}")
                received = _SharedOnly(replies, path) if path.startswith("shm") else replies
                with connect_push(ctx, ready.info["endpoint"], hwm=1) as requests:
                    seconds = await _fetch_kv(requests, received, dst, count, progress)
                nursery.cancel_scope.cancel()
        return seconds
    finally:
        await trio.to_thread.run_sync(process.join, 10.0)
        if process.is_alive():
            process.kill()
        ctx.destroy(linger=0)


async def _fail_if_exits(process: multiprocessing.process.BaseProcess) -> None:
    await trio.lowlevel.wait_readable(process.sentinel)
    process.join()
    raise BenchmarkError(f"the prefill process exited early with code {process.exitcode}")


class _SharedOnly:
    """The decode side of an shm path: a reply whose KV came as a frame (no room in shared memory) fails the run
    rather than timing ipc under the shm name."""

    def __init__(self, replies: TrioSocket, path: str) -> None:
        self.replies, self.path = replies, path

    async def receive(self) -> Any:
        frames = await self.replies.receive_frames()
        if len(frames) != 2:  # type, struct: no tensor frame
            raise BenchmarkError(f"{self.path}: the KV came as a ZeroMQ frame, not through shared memory")
        return wire.decode(frames)


def prefill_process(path: str, endpoint: str, dims: tuple[int, ...], dtype: str) -> None:
    """The prefill side's process main (spawned): one zmq.Context, `trio.run`, then the context's end."""
    kv = _payload(dims, dtype)  # [L, 2, T, H, D]
    if path == "shm-zero-copy":
        kv = shared_memory.arena().empty(kv.shape, kv.dtype).copy_(kv)  # [L, 2, T, H, D], in shared memory
    ctx = zmq.Context()
    try:
        trio.run(_prefill_main, ctx, path, endpoint, kv)
    finally:
        ctx.term()  # every socket is closed; LINGER bounds the wait for the last reply


async def _prefill_main(ctx: zmq.Context, path: str, endpoint: str, kv: torch.Tensor) -> None:
    transport = "tcp" if path == "tcp" else "ipc"
    requests, requests_endpoint = bind_pull(ctx, transport, "kv-prefill", hwm=1)
    shared = path.startswith("shm")
    with requests, connect_push(ctx, endpoint, hwm=1, shared_memory=shared) as replies:
        await announce_ready(replies, "prefill", {"endpoint": requests_endpoint})
        await _serve_kv(requests, replies, kv)


def print_table(report: KVTransferReport) -> None:
    from rich.console import Console
    from rich.table import Table

    shape = report.config.shape
    title = (
        f"W7 KV transfer: {shape.num_tokens}-token prompt, KV {list(shape.dims)} {report.config.dtype} "
        f"= {report.nbytes / 1e6:.1f} MB"
    )
    table = Table("path", "GB/s (median)", "ms (median)", "ms (min)", "vs memcpy", title=title)
    for result in report.results:
        row = report.row(result.path)
        ratio = "–" if math.isnan(row["vs_memcpy"]) else f"{row['vs_memcpy']:.2f}×"
        table.add_row(
            result.path, f"{row['gbps_median']:.2f}", f"{row['ms_median']:.1f}", f"{row['ms_min']:.1f}", ratio
        )
    table.caption = f"timed: the decode side's ask → PrefillDone → copy into its buffer; {_machine_line(report)}"
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def write_results(report: KVTransferReport, out_dir: Path) -> tuple[Path, Path]:
    """kv_transfer.json (every number, the machine) and kv_transfer.png (GB/s per path) under `out_dir`."""
    return write_json_and_plot(out_dir / "kv_transfer", report.to_json(), lambda png: _plot(report, png))


def _machine_line(report: KVTransferReport) -> str:
    m = report.machine
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}; "
        f"median of {report.config.repeats} transfers after {report.config.warmup} warm-up"
    )


def _plot(report: KVTransferReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [r.path for r in report.results]
    gbps = [report.row(p)["gbps_median"] for p in paths]
    fig, ax = plt.subplots(figsize=(2 + 1.4 * len(paths), 4.4))
    bars = ax.bar(paths, gbps, color=[f"C{PATHS.index(p)}" for p in paths])
    ax.bar_label(bars, fmt="%.2f", fontsize=9, padding=2)
    ax.set_ylabel("GB/s (higher is better)")
    ax.margins(y=0.15)
    tokens, megabytes = report.config.shape.num_tokens, report.nbytes / 1e6
    ax.set_title(f"KV of a {tokens}-token prompt ({megabytes:.1f} MB), prefill → decode", fontsize=10)
    fig.text(0.5, 0.01, _machine_line(report), ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
