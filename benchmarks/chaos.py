"""`sagellm bench chaos`: the gateway as a user runs it (`sagellm serve graphs/pd.yaml`: prefill and decode workers
under it) put through bad input, junk, overload and faults, and a table of what was tried, what each answered, how
many server errors (must be 0), how many requests were lost (no end, two ends, or a hang: must be 0), and how long
service took to come back.

Phases, in order, against the one server unless said:
- start: a damaged sessions.json in the state dir; the server must start, move it aside and say so.
- bad inputs: the hand-made cases of `chaos_cases` (each once a crash, a failed batch or a 500), beside 8 streams.
- junk: random bytes, truncated and oversized msgpack on every ZeroMQ socket of the run (its ipc files).
- big prompts: three 8 MB prompts at once, ten times, while `/health` and small streams are timed (their p99 must
  stay small: the small streams' TTFT is shown beside theirs alone, just before); against the server, and against
  the gateway in front of the instant engine (`instant_server`, W5: no model compute), where the < 50 ms holds.
- faults: kill -9 of the decode and the prefill worker, and SIGSTOP of the decode worker, each under 32 streams;
  every stream must end once, and the worker must be restarted (recovery: the signal → `/ready` with every engine
  ready again).
- overload: `--overload-factor` × the admission bound of clients in a closed loop for `--overload-s`, each on one
  keep-alive raw connection (`raw_http`: ~0.4 ms of CPU per streamed request, where httpx took 15-30); shed requests
  must get 429 + Retry-After (and are retried after it), memory must stay bounded, and 99% of the admitted requests
  must get their first token within the `--ttft-slo-ms` the server is given (admission adapts its bound to it).
  The overload comes after the faults: the bound it leaves low grows back only as traffic flows.
- files: `sagellm run` on a YAML alias bomb, and on a truncated model file: a clear error, soon, never a hang."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio
import zmq

from sagellm.benchmarks.chaos_cases import BAD_INPUTS
from sagellm.benchmarks.proc_stats import children, cmdline, cpu_seconds, rss_kb
from sagellm.benchmarks.raw_http import ConnectionClosed, RawClient, lines
from sagellm.benchmarks.vllm_results import cpu_description
from sagellm.common.processes import python_module
from sagellm.gateway.errors import RETRY_AFTER_S
from sagellm.runtime.comm.zmq_trio import IPC_DIR_ENV

FAULT_STREAMS = 32
FAULTS = (("decode", signal.SIGKILL), ("prefill", signal.SIGKILL), ("decode", signal.SIGSTOP))
PHASES = ("bad-inputs", "junk", "big-prompts", "faults", "overload", "files")  # after the start, in this order
READY_TIMEOUT_S = 900  # a first run may download or convert the model
STREAM_TIMEOUT_S = 120  # a stream with nothing for this long hung
WORKER_MODULE = "sagellm.runtime.executor.worker"
RETRIED: list[str] = []  # requests sent again after the server closed their pooled connection (reported)
SAGELLM = python_module("sagellm.cli.main")  # the CLI with this interpreter, on PATH or not


@dataclass
class Row:
    phase: str
    tried: str
    answers: str
    server_errors: int = 0
    lost: int = 0
    recovery_s: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--graph", default="graphs/pd.yaml", help="the graph served (default: %(default)s)")
    parser.add_argument("--model", "-m", default=None, help="the graph's model (default: the graph's, SmolLM2-135M)")
    parser.add_argument("--max-queue", type=int, default=32, help="admission bound during the run (default: 32)")
    parser.add_argument("--overload-factor", type=int, default=10, help="clients per admission slot (default: 10)")
    parser.add_argument("--overload-s", type=float, default=60.0, help="how long the overload lasts (default: 60)")
    parser.add_argument(
        "--ttft-slo-ms", type=float, default=2500.0, help="the server's TTFT target (admission.ttft_slo_ms)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the junk")
    parser.add_argument("--only", action="append", choices=PHASES, help="run only this phase (repeat; default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/chaos.json"), help="JSON results")


def run(args: argparse.Namespace) -> int:
    rows = trio.run(_run, args)
    cpu = cpu_description()
    table = markdown(rows)
    print(table)
    print(f"\nCPU: {cpu}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"cpu": cpu, "graph": args.graph, "model": args.model, "rows": [asdict(r) for r in rows]}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results: {args.out}", file=sys.stderr)
    failed = [r.phase for r in rows if r.server_errors or r.lost]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def markdown(rows: list[Row]) -> str:
    lines = ["| phase | tried | answered | 5xx | lost | recovery s |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        recovery = f"{r.recovery_s:.1f}" if r.recovery_s is not None else "—"
        lines.append(f"| {r.phase} | {r.tried} | {r.answers} | {r.server_errors} | {r.lost} | {recovery} |")
    return "\n".join(lines)


def progress(message: str, bench: str = "chaos") -> None:
    print(f"[{bench}] {message}", file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace) -> list[Row]:
    rng = random.Random(args.seed)
    wanted = set(args.only or PHASES)
    with tempfile.TemporaryDirectory(prefix="sagellm-chaos-") as scratch:
        work = Path(scratch)
        admission = (f"admission.max_queue={args.max_queue}", f"admission.ttft_slo_ms={args.ttft_slo_ms:g}")
        server = Server(work, args.graph, args.model, tuple(x for pair in admission for x in ("--set", pair)))
        rows = [await start_over_damaged_sessions(server)]
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=STREAM_TIMEOUT_S) as client:
                if "bad-inputs" in wanted:
                    rows.append(await bad_inputs(client))
                if "junk" in wanted:
                    rows.append(await junk(client, server, rng))
                if "big-prompts" in wanted:
                    rows.append(await big_prompts(server.port, work, "small", "SmolLM2, pd.yaml"))
                    rows.append(await big_prompts_instant(client, work))
                if "faults" in wanted:
                    for group, fault in FAULTS:
                        rows.append(await lost_worker(client, server, group, fault))
                if "overload" in wanted:  # last: the admission bound it leaves low takes traffic to grow back
                    rows.append(await overload(client, server, args))
        finally:
            server.stop()
        if "files" in wanted:
            rows += [await alias_bomb(work), await truncated_model(work, args.model)]
    return rows


# -- the server ---------------------------------------------------------------------------------------------------
class Server:
    """`sagellm serve GRAPH` in its own process (also the faults benchmark's), ipc sockets in a folder of ours (so the
    junk phase finds them all); `extra`: more command-line options."""

    def __init__(
        self, work: Path, graph: str, model: str | None, extra: tuple[str, ...] = (), bench: str = "chaos"
    ) -> None:
        self.work, self.graph, self.model, self.extra, self.bench = work, graph, model, extra, bench
        self.state, self.ipc, self.log = work / "state", work / "ipc", work / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    async def start(self, ready_path: str = "/ready") -> float:
        """Starts it and waits until `ready_path` answers 200 (a gateway with no engine yet is never ready: wait for
        `/v1/models`); the seconds that took."""
        self.state.mkdir(parents=True, exist_ok=True)
        self.ipc.mkdir(exist_ok=True)
        command = [*SAGELLM, "serve", self.graph, "--port", str(self.port), "--no-embedding"]
        command += ["--state-dir", str(self.state), *self.extra]
        command += ["--model", self.model] if self.model else []
        env = {**os.environ, IPC_DIR_ENV: str(self.ipc), "SAGELLM_LOG_LEVEL": "warning"}
        progress(f"starting sagellm {' '.join(command[len(SAGELLM) :])}", self.bench)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=self.url) as client:
            while not await _answers(client, ready_path):
                if self.process.poll() is not None or time.monotonic() - started > READY_TIMEOUT_S:
                    raise RuntimeError(f"the server did not start; its log: {self.log}\n{self.log.read_text()[-2000:]}")
                await trio.sleep(0.5)
        progress(f"ready in {time.monotonic() - started:.0f} s; workers {self.workers()}", self.bench)
        return time.monotonic() - started

    def workers(self) -> dict[str, int]:
        """Worker group -> pid, of the workers running under the server now."""
        found = {}
        for pid in children(self.process.pid):
            command = cmdline(pid)
            if WORKER_MODULE in command and "--group" in command:
                found[command[command.index("--group") + 1]] = pid
        return found

    def rss_mb(self) -> float:
        """Resident memory of the server and its workers."""
        pids = [self.process.pid, *children(self.process.pid)]
        return sum(rss_kb(pid) for pid in pids) / 1024

    def gateway_cpu_s(self) -> float:
        """CPU seconds the gateway's own process has used so far (its workers not counted)."""
        return cpu_seconds(self.process.pid)

    def cpu_s(self) -> float:
        """CPU seconds the server and its workers have used so far."""
        return cpu_seconds(self.process.pid, *children(self.process.pid))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


async def start_over_damaged_sessions(server: Server) -> Row:
    """The server must start anyway, keep the bad sessions file aside and say so."""
    server.state.mkdir(parents=True)
    (server.state / "sessions.json").write_text('{"sessions": [ {"id": "torn')
    await server.start()
    kept = sorted(p.name for p in server.state.glob("sessions.json.bad-*"))
    said = "sessions_file_unreadable" in server.log.read_text()
    answer = f"started; the file moved aside as {kept[0]} and logged" if kept and said else "NOT moved aside/said"
    return Row("start over a damaged sessions.json", "1 file", answer, lost=0 if kept and said else 1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _answers(client: httpx.AsyncClient, path: str) -> bool:
    try:
        return (await client.get(path)).status_code == 200
    except httpx.HTTPError:
        return False


# -- streams ------------------------------------------------------------------------------------------------------
async def stream(client: httpx.AsyncClient, prompt: str, max_tokens: int, ends: list[str], ttft: list[float]) -> None:
    """One streamed completion: appends what ended it (a finish reason or an error code) to `ends`, once per end
    seen, and its time to the first token to `ttft`."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0}
    for attempt in range(2):
        sent = time.monotonic()
        try:
            await _stream_once(client, body, ends, ttft, sent)
            return
        except httpx.RemoteProtocolError as error:
            if attempt or ends or ttft:  # not the pooled-connection race: a lost request
                ends.append(f"transport {type(error).__name__}")
                return
            RETRIED.append(
                str(prompt)
            )  # the server closed a pooled connection as it was reused: sent again, as SDKs do
        except httpx.HTTPError as error:
            ends.append(f"transport {type(error).__name__}")
            return


async def _stream_once(
    client: httpx.AsyncClient, body: dict[str, Any], ends: list[str], ttft: list[float], sent: float
) -> None:
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            code = json.loads(await reply.aread())["error"]["code"]
            unsaid = reply.status_code == 429 and "retry-after" not in reply.headers
            ends.append(f"{reply.status_code} {code}" + (" without Retry-After" if unsaid else ""))
            return
        async for line in reply.aiter_lines():
            end, token = stream_event(line)
            if token and not ttft:
                ttft.append(time.monotonic() - sent)
            if end is not None:
                ends.append(end)


async def raw_stream(
    client: RawClient, prompt: str | list[int], max_tokens: int, ends: list[str], ttft: list[float]
) -> None:
    """`stream` over one keep-alive raw connection (the overload's clients: cheap enough not to be what is measured).
    A connection the server closed as it was reused is opened again and the request sent again, once."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0}
    for attempt in range(2):
        sent, answered = time.monotonic(), False
        try:
            reply, chunks = await client.post("/v1/completions", body)
            answered = True
            if reply.status != 200:
                code = json.loads(b"".join([c async for c in chunks]))["error"]["code"]
                unsaid = reply.status == 429 and "retry-after" not in reply.headers
                ends.append(f"{reply.status} {code}" + (" without Retry-After" if unsaid else ""))
                return
            async for line in lines(chunks):
                end, token = stream_event(line)
                if token and not ttft:
                    ttft.append(time.monotonic() - sent)
                if end is not None:
                    ends.append(end)
            return
        except (OSError, ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, ValueError) as error:
            await client.aclose()
            if attempt or answered:
                ends.append(f"transport {type(error).__name__}")
                return
            RETRIED.append(str(prompt))


def stream_event(line: str) -> tuple[str | None, bool]:
    """One line of a streamed completion: what it ends the stream with (a finish reason or an error code), if
    anything, and whether it carries a token."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None, False
    event = json.loads(line.removeprefix("data: "))
    if "error" in event:
        return event["error"]["code"], False
    return event["choices"][0]["finish_reason"], True


def lost_count(ends: list[list[str]], ok: set[str]) -> int:
    """Requests with no end, more than one, or an end that is neither an answer nor a clear error."""
    return sum(len(e) != 1 or not (e[0] in ok or e[0][:1].isdigit()) for e in ends)


def status_of(ends: list[str]) -> str:
    """The HTTP status a stream got ("200" once streaming), or what ended it otherwise ("transport ...")."""
    if len(ends) != 1:
        return f"{len(ends)} ends"
    end = ends[0]
    return end.split()[0] if end[:1].isdigit() else end if end.startswith("transport") else "200"


def tally(values: list[str]) -> str:
    return ", ".join(f"{name} ×{count}" for name, count in Counter(values).most_common())


# -- phases -------------------------------------------------------------------------------------------------------
async def bad_inputs(client: httpx.AsyncClient) -> Row:
    progress(f"bad inputs: {len(BAD_INPUTS)} cases beside 8 streams")
    ends: list[list[str]] = [[] for _ in range(8)]
    statuses: list[int] = []
    async with trio.open_nursery() as nursery:
        for i, e in enumerate(ends):
            nursery.start_soon(stream, client, f"innocent {i}", 64, e, [])
        await trio.sleep(0.2)
        for case in BAD_INPUTS:
            reply = await client.request(
                case.method, case.path, json=case.json, content=case.content, headers=case.headers
            )
            statuses.append(reply.status_code)
    wrong = [c.name for c, s in zip(BAD_INPUTS, statuses, strict=True) if s != c.status]
    answers = tally([str(s) for s in statuses]) + (f"; unexpected: {', '.join(wrong)}" if wrong else ", all as due")
    return Row(
        f"bad inputs ({len(BAD_INPUTS)} kinds) beside 8 streams",
        f"{len(BAD_INPUTS)} requests",
        answers + f"; streams: {tally([x for e in ends for x in e])}",
        server_errors=sum(s >= 500 for s in statuses),
        lost=lost_count(ends, {"length"}) + len(wrong),
    )


def junk_messages(rng: random.Random) -> list[list[bytes]]:
    """What a stranger on the network can send: random bytes, truncated or lying msgpack, names that are not UTF-8."""
    messages = [[rng.randbytes(rng.randint(1, 64)) for _ in range(rng.randint(1, 5))] for _ in range(40)]
    messages += [
        [b"\xff\xfe", b"\x80", b"\x01", b"x"],
        [b"decode", b"source", b"\x01", b"\x92\x01"],
        [b"decode", b"source", b"\x01", b"\xdd\xff\xff\xff\xff"],
        [b"decode", b"source", b"\x01", b"\xc1" * 1000],
        [b"\x05", b"\x94\xa6decode\x01\xa1h\x02"],  # a Hello in the wrong place
        [rng.randbytes(1 << 20)],  # 1 MiB of noise
    ]
    return messages


async def junk(client: httpx.AsyncClient, server: Server, rng: random.Random) -> Row:
    sockets = sorted(server.ipc.iterdir())
    messages = junk_messages(rng)
    before = server.workers()
    progress(f"junk: {len(messages)} messages to each of {len(sockets)} sockets")
    zctx = zmq.Context()
    try:
        for path in sockets:
            kind = zmq.DEALER if path.name.startswith("control") else zmq.PUSH
            with zctx.socket(kind) as sock:
                sock.setsockopt(zmq.LINGER, 2000)
                sock.connect(f"ipc://{path}")
                for frames in messages:
                    sock.send_multipart(frames)
    finally:
        zctx.term()
    await trio.sleep(1.0)
    ends: list[str] = []
    await stream(client, "after the junk", 16, ends, [])
    same = server.workers() == before
    answers = f"no process died: {'yes' if same else 'NO'}; a request after: {tally(ends)}"
    return Row("junk on every ZeroMQ socket", f"{len(messages) * len(sockets)} messages, {len(sockets)} sockets",
               answers, lost=lost_count([ends], {"length"}) + (not same))  # fmt: skip


async def big_prompts(port: int, work: Path, small_prompt: str | list[int], phase: str, rounds: int = 10) -> Row:
    """`rounds` times three 8 MB prompts at once to the server on `port`, from curl processes (so the probes' own
    event loop never blocks on sending them), while `/health` and two small streams are timed over raw connections
    (cheap: the prober's own lag stays out of the numbers); the small streams alone just before, to compare."""
    progress(f"big prompts ({phase}): {rounds} × three 8 MB prompts while /health and small streams are timed")
    health_ms: list[float] = []
    ttfts: list[float] = []
    statuses: list[str] = []
    ends: list[list[str]] = []
    done = trio.Event()

    body = work / "big.json"
    body.write_text(json.dumps({"prompt": "word " * 1_600_000, "max_tokens": 4}))  # 8 MB

    async def big() -> None:
        command = ["curl", "-s", "-w", "\n%{http_code}", "-H", "Content-Type: application/json"]
        done = await trio.run_process([*command, "--data-binary", f"@{body}", f"http://127.0.0.1:{port}/v1/completions"],
                                      capture_stdout=True, check=False)  # fmt: skip
        answer, _, status = done.stdout.decode().rpartition("\n")
        try:
            code = json.loads(answer).get("error", {}).get("code", "")
        except ValueError:
            code = "unreadable"
        statuses.append(f"{status} {code}".strip())

    async def probe() -> None:
        connection = RawClient("127.0.0.1", port)
        while not done.is_set():
            sent = time.monotonic()
            await connection.get("/health")
            health_ms.append((time.monotonic() - sent) * 1000)
            await trio.sleep(0.01)
        await connection.aclose()

    async def small(ttfts: list[float]) -> None:
        connection = RawClient("127.0.0.1", port)
        while not done.is_set():
            e: list[str] = []
            t: list[float] = []
            await raw_stream(connection, small_prompt, 8, e, t)
            ends.append(e)
            ttfts.extend(x * 1000 for x in t)
        await connection.aclose()

    alone: list[float] = []
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(small, alone)
        await trio.sleep(5)
        done.set()
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        for _ in range(2):
            nursery.start_soon(small, ttfts)
        for _ in range(rounds):
            async with trio.open_nursery() as bigs:
                for _ in range(3):
                    bigs.start_soon(big)
        done.set()
    p99 = (
        f"/health p99 {np.percentile(health_ms, 99):.0f} ms, small streams' TTFT p99 {np.percentile(ttfts, 99):.0f} ms"
        f" (alone just before: {np.percentile(alone, 99):.0f} ms)"
    )
    errors = sum(s.startswith("5") for s in statuses)
    phase_name = f"8 MB prompts ×3 at once, {rounds} times ({phase})"
    answers = f"{tally(statuses)}; {p99}"
    return Row(phase_name, f"{3 * rounds} requests", answers, server_errors=errors, lost=lost_count(ends, {"length"}))


async def big_prompts_instant(client: httpx.AsyncClient, work: Path) -> Row:
    """The same in front of the instant engine (W5: no model compute), the gateway's own share of the wait."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = python_module("sagellm.benchmarks.instant_server", "--port", str(port))
    env = {**os.environ, "SAGELLM_LOG_LEVEL": "warning"}
    with (work / "instant.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        with trio.fail_after(60):
            while not await _answers(client, f"{url}/ready"):
                await trio.sleep(0.2)
        return await big_prompts(port, work, list(range(32)), "instant engine, W5")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)  # a request still in flight may hold the stop up to the graceful timeout
        except subprocess.TimeoutExpired:
            process.kill()


async def overload(client: httpx.AsyncClient, server: Server, args: argparse.Namespace) -> Row:
    progress(f"overload: first {args.max_queue} clients (1×) for 10 s, the TTFT to compare with")
    *_, ttfts_1x = await closed_loop(server, args.max_queue, 10.0)
    baseline = np.percentile(ttfts_1x, [50, 99]) if ttfts_1x else [float("nan")] * 2
    clients = args.overload_factor * args.max_queue
    RETRIED.clear()
    progress(f"overload: {clients} clients for {args.overload_s:.0f} s (admission bound {args.max_queue})")
    server_cpu, gateway_cpu, client_cpu = server.cpu_s(), server.gateway_cpu_s(), sum(os.times()[:2])
    slo_before = await slo_counts(client)
    statuses, ends, no_retry_after, rss, ttfts = await closed_loop(server, clients, args.overload_s)
    checked, missed = (after - before for after, before in zip(await slo_counts(client), slo_before))
    server_cpu, client_cpu = server.cpu_s() - server_cpu, sum(os.times()[:2]) - client_cpu
    gateway_cpu = server.gateway_cpu_s() - gateway_cpu
    p = np.percentile(ttfts, [50, 99]) if ttfts else [float("nan")] * 2
    odd = [x for e in ends for x in e if x != "length"]
    met = f"{100 * (checked - missed) / checked:.1f}%" if checked else "n/a"
    answers = (
        f"{tally(statuses)}; 429s without Retry-After: {no_retry_after}; admitted requests within the"
        f" {args.ttft_slo_ms:g} ms TTFT SLO as the server timed them: {met} ({checked - missed:.0f}/{checked:.0f});"
        f" TTFT p50/p99 as the load generator saw it {p[0]:.0f}/{p[1]:.0f} ms (at 1×: {baseline[0]:.0f}/"
        f"{baseline[1]:.0f} ms); RSS {rss[0]:.0f} → max {max(rss):.0f} MB; CPU s: gateway {gateway_cpu:.0f},"
        f" workers {server_cpu - gateway_cpu:.0f}, load generator {client_cpu:.0f}"
        + (f"; other ends: {tally(odd)}" if odd else "")
        + (f"; sent again after a closed pooled connection: {len(RETRIED)}" if RETRIED else "")
    )
    return Row(f"overload {args.overload_factor}× for {args.overload_s:.0f} s", f"{len(statuses)} requests, {clients}"
               " clients", answers, server_errors=sum(s.startswith("5") for s in statuses),
               lost=lost_count(ends, {"length"}) + no_retry_after)  # fmt: skip


async def slo_counts(client: httpx.AsyncClient) -> tuple[float, float]:
    """The server's count of finished requests that had an SLO, and of those that missed it (its /metrics)."""
    text = (await client.get("/metrics")).text
    totals = {"sagellm:slo_checked_total": 0.0, "sagellm:slo_violations_total": 0.0}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.split("{")[0] in totals:
            totals[name.split("{")[0]] += float(value)
    return totals["sagellm:slo_checked_total"], totals["sagellm:slo_violations_total"]


async def closed_loop(
    server: Server, clients: int, duration_s: float
) -> tuple[list[str], list[list[str]], int, list[float], list[float]]:
    """`clients` clients each streaming one request after another for `duration_s`, waiting Retry-After when shed.
    Returns every request's status, the ends of the admitted ones, the 429s without Retry-After, the RSS samples
    (MB) and the admitted requests' TTFTs (ms)."""
    statuses: list[str] = []
    ttfts: list[float] = []
    ends: list[list[str]] = []
    no_retry_after = 0
    rss = [server.rss_mb()]
    deadline = trio.current_time() + duration_s

    async def one_client(i: int) -> None:
        nonlocal no_retry_after
        connection = RawClient("127.0.0.1", server.port)
        while trio.current_time() < deadline:
            e: list[str] = []
            t: list[float] = []
            with trio.move_on_after(STREAM_TIMEOUT_S) as waited:
                await raw_stream(connection, f"overload {i}", 16, e, t)
            if waited.cancelled_caught:
                await connection.aclose()
                e.append("transport hung")
            statuses.append(status_of(e))
            if e and e[0].startswith("429"):
                no_retry_after += e[0].endswith("without Retry-After")
                await trio.sleep(RETRY_AFTER_S)  # what the gateway says (a client that did not wait: no load)
                continue
            ends.append(e)
            ttfts.extend(x * 1000 for x in t)
        await connection.aclose()

    async def sample_memory() -> None:
        while trio.current_time() < deadline:
            rss.append(server.rss_mb())
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_memory)
        for i in range(clients):
            nursery.start_soon(one_client, i)
    return statuses, ends, no_retry_after, rss, ttfts


async def lost_worker(client: httpx.AsyncClient, server: Server, group: str, fault: signal.Signals) -> Row:
    name = f"{'kill -9' if fault == signal.SIGKILL else 'SIGSTOP'} {group} worker under {FAULT_STREAMS} streams"
    progress(name)
    pid = server.workers()[group]
    ends: list[list[str]] = [[] for _ in range(FAULT_STREAMS)]
    firsts: list[list[float]] = [[] for _ in range(FAULT_STREAMS)]
    recovery: float | None = None
    async with trio.open_nursery() as nursery:
        for i in range(FAULT_STREAMS):
            nursery.start_soon(stream, client, f"stream {i}", 256, ends[i], firsts[i])
        while sum(map(bool, firsts)) < FAULT_STREAMS // 2 and not all(ends):  # half of them are streaming
            await trio.sleep(0.05)
        os.kill(pid, fault)
        struck = time.monotonic()
        while time.monotonic() - struck < READY_TIMEOUT_S:
            health = (await client.get("/ready")).json()
            if server.workers().get(group, pid) != pid and all(e["state"] == "ready" for e in health["engines"]):
                recovery = time.monotonic() - struck
                break
            await trio.sleep(0.1)
    return Row(name, f"{FAULT_STREAMS} streams", tally([x for e in ends for x in e]),
               server_errors=sum(x.startswith("500") or x == "internal" for e in ends for x in e),
               lost=lost_count(ends, {"length", "instance_lost"}), recovery_s=recovery)  # fmt: skip


async def _sagellm_run(arguments: list[str], timeout_s: float = 300) -> tuple[int | None, float, str]:
    """Exit code (None: still running at the timeout, a hang), seconds taken and the last line of stderr."""
    started = time.monotonic()
    with trio.move_on_after(timeout_s):
        done = await trio.run_process([*SAGELLM, "run", *arguments], capture_stdout=True, capture_stderr=True,
                                      check=False)  # fmt: skip
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return done.returncode, time.monotonic() - started, last[0][:160]
    return None, timeout_s, "still running: a hang"


async def alias_bomb(work: Path) -> Row:
    progress("files: a YAML alias bomb")
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = work / "bomb.yaml"
    path.write_text("\n".join(levels) + "\nnodes: {}\n")
    code, took, said = await _sagellm_run([str(path), "--prompt", "hi"])
    ok = code not in (None, 0)
    return Row("YAML alias bomb (10^10 nodes)", "sagellm run", f"exit {code} in {took:.1f} s: {said}", lost=int(not ok))


async def truncated_model(work: Path, model: str | None) -> Row:
    progress("files: a truncated model file")
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model  # loads nothing heavy

    source = Path(resolve_model(model or DEFAULT_MODEL))
    source = source if source.is_file() else next(iter([*source.glob("*.gguf"), *source.glob("*.safetensors")]), source)
    if not source.is_file():
        return Row("truncated model file", "skipped", f"no single model file in {source}")
    target = work / "truncated" / source.name
    target.parent.mkdir()
    with source.open("rb") as src:
        target.write_bytes(src.read(source.stat().st_size // 2))
    code, took, said = await _sagellm_run(["graphs/colocated.yaml", "--model", str(target), "--prompt", "hi"])
    ok = code not in (None, 0)
    return Row(f"model file cut in half ({source.suffix})", "sagellm run", f"exit {code} in {took:.1f} s: {said}",
               lost=int(not ok))  # fmt: skip
