"""`sagellm bench faults`: an engine instance killed mid-run, with and without failover, as a user runs the server.

Two setups of three instances of one model, each run three times: without a fault (the reference), then killing one
instance (SIGKILL) once half of the streams have their first token, with failover off (`--max-retries 0`) and on (the
default). Route is round robin, so a third of the streams run on each instance.
- workers: `sagellm serve` on a graph of three engine worker processes (the pipeline restarts the killed one);
- engines: `sagellm serve` on a graph with no engine of its own and three `llm` engines started through the
  management API, each its own server process (the gateway's supervisor restarts the killed one); with `--peer-url`
  the third is that server instead (vLLM-CPU, llama.cpp: `../shared/peers/serve.sh`), attached as an `openai` engine.
  They serve a name of their own, so the gateway resumes a request there from its text.
- replicas: `sagellm serve` of the colocated graph (its own engine) and two `llm` engines under the gateway's own model
  name, replicas of it (with `--peer-url` the second is that server): requests are tokenized at the gateway and the
  replicas stream token ids back, so a resume on any of the three is by tokens. The killed one is the first replica.
Each run sends the same `--streams` greedy completions at once. Per run: streams completed, failed with a clear
error, lost (no end, two ends or a hang: must be 0), how many were resumed after tokens (the gateway's
`sagellm:request_retries_total{resumed="true"}`), texts identical to the reference run's, end-to-end latency (p50,
p99, and the most any stream took beyond its reference), and the time from the kill until the killed instance is
ready again. A table on stdout (markdown, for the README), JSON and a PNG."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import trio

from sagellm import graphs
from sagellm.benchmarks.chaos_report import lost_count, progress, tally
from sagellm.benchmarks.chaos_server import READY_TIMEOUT_S, Server
from sagellm.benchmarks.chaos_streams import STREAM_TIMEOUT_S
from sagellm.benchmarks.report import write_json_and_plot
from sagellm.benchmarks.vllm_results import cpu_description
from sagellm.common.errors import StartFailed

GRAPH = """\
name: three_workers
description: Three engine worker processes of one model behind the router (the faults benchmark).
model: smollm2-135m-instruct
transport: ipc
nodes:
  source: {op: prompt_source}
  admission: {op: admission}
  sort: {op: policy_sort}
  route: {op: route, params: {strategy: round_robin}}
  engine_a: {op: engine, placement: process}
  engine_b: {op: engine, placement: process}
  engine_c: {op: engine, placement: process}
  metrics: {op: metrics_sink}
edges:
  - source -> admission -> sort -> route -> [engine_a, engine_b, engine_c]
  - engine_a -> metrics
  - engine_b -> metrics
  - engine_c -> metrics
"""
KILLED = "engine_a"  # the worker killed in the workers setup
POOL = "pool"  # the model name the engines setup serves under
RESUMED = re.compile(r'^sagellm:request_retries_total\{code="\w+",resumed="true"\} (\S+)$', re.MULTILINE)


@dataclass
class Stream:
    text: str = ""
    ends: list[str] = field(default_factory=list)
    first_token_s: float | None = None
    e2e_s: float | None = None


@dataclass
class Run:
    name: str
    streams: int
    completed: int
    failed: str  # the errors, tallied
    lost: int
    resumed: int
    same_text: int | None  # as the reference run's (None: this is the reference)
    e2e_p50_s: float
    e2e_p99_s: float
    most_added_s: float | None  # the most a stream took beyond its reference
    recovery_s: float | None  # kill -> every engine ready again


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="the model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams per run (default: 64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (default: 64)")
    parser.add_argument(
        "--setups", default="workers,engines", help="comma list of workers, engines, replicas (default: %(default)s)"
    )
    parser.add_argument("--peer-url", help="engines/replicas: this OpenAI-compatible server is one of the instances")
    parser.add_argument("--peer-model", default="smollm2", help="the model's name at the peer (default: smollm2)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/faults.json"), help="JSON results")


def run(args: argparse.Namespace) -> int:
    runs = trio.run(_run, args)
    cpu = cpu_description()
    table = markdown(runs)
    print(table)
    print(f"\nCPU: {cpu}")
    payload = {"cpu": cpu, "model": args.model, "runs": [asdict(r) for r in runs]}
    written = write_json_and_plot(args.out.with_suffix(""), payload, lambda png: plot(runs, png, cpu))
    print(f"results: {written[0]}, chart: {written[1]}", file=sys.stderr)
    return 0 if all(r.lost == 0 for r in runs) else 1


async def _run(args: argparse.Namespace) -> list[Run]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="sagellm-faults-") as scratch:
        for setup in args.setups.split(","):
            graph = Path(scratch) / f"{setup}.yaml"
            shipped = {"engines": "control_plane", "replicas": "colocated"}
            graph.write_text(GRAPH if setup == "workers" else graphs.find(shipped[setup]).read_text())
            reference = None
            for name, extra, kill in (
                ("no fault", (), False),
                ("kill -9 one of 3, failover off", ("--max-retries", "0"), True),
                ("kill -9 one of 3, failover on", (), True),
            ):
                work = Path(scratch) / f"{setup}-{len(runs)}"
                peer = ("--allowed-upstream", httpx.URL(args.peer_url).netloc.decode()) if args.peer_url else ()
                flags = (*extra, *peer, "--routing", "round_robin")
                server = Server(work, str(graph), args.model, flags, bench="faults")
                await server.start("/v1/models" if setup == "engines" else "/ready")
                try:
                    if setup == "workers":
                        instances: Workers | Engines = Workers(server)
                    else:
                        instances = await Engines.start(server, args, replicas=setup == "replicas")
                    streams, recovery = await _streams(server, instances, args, kill)
                    resumed = _resumed(httpx.get(server.url + "/metrics").text)
                finally:
                    server.stop()
                runs.append(_summary(f"{setup}: {name}", streams, reference, resumed, recovery))
                reference = reference or streams
                progress(f"{runs[-1]}", "faults")
    return runs


class Workers:
    """The workers setup's instances: engine worker processes of the served graph."""

    model: str | None = None

    def __init__(self, server: Server) -> None:
        self.server = server

    def victim(self) -> int:
        return self.server.workers()[KILLED]

    async def back(self, client: httpx.AsyncClient, pid: int) -> bool:
        health = (await client.get("/ready")).json()
        return self.server.workers().get(KILLED, pid) != pid and all(e["state"] == "ready" for e in health["engines"])


class Engines:
    """The engines and replicas setups' instances: engines started through the management API (and the peer, if
    given): three under a name of their own, or two under the gateway's own model name beside its engine."""

    def __init__(self, admin: httpx.Client, ids: list[str], model: str | None) -> None:
        self.admin, self.ids, self.model = admin, ids, model

    @classmethod
    async def start(cls, server: Server, args: argparse.Namespace, *, replicas: bool = False) -> Engines:
        key = (server.state / "admin.key").read_text().strip()
        admin = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {key}"}, timeout=60)
        name = admin.get("/v1/models").json()["data"][0]["id"] if replicas else POOL
        bodies = [{"model": args.model or "smollm2-135m-instruct", "served_model_name": name}] * (2 if replicas else 3)
        if args.peer_url:
            peer = {"kind": "openai", "url": args.peer_url, "model": args.peer_model, "served_model_name": name}
            bodies[-1] = peer
        ids = [admin.post("/v1/management/engines", json=body).json()["id"] for body in bodies]
        started = time.monotonic()
        while not all(admin.get(f"/v1/management/engines/{i}").json()["state"] == "ready" for i in ids):
            if time.monotonic() - started > READY_TIMEOUT_S:
                raise StartFailed(f"the engines did not become ready: {admin.get('/v1/management/engines').text}")
            await trio.sleep(0.5)
        progress(f"engines ready in {time.monotonic() - started:.0f} s: {ids}", "faults")
        return cls(admin, ids, None if replicas else POOL)

    def victim(self) -> int:
        return self.admin.get(f"/v1/management/engines/{self.ids[0]}").json()["pid"]

    async def back(self, client: httpx.AsyncClient, pid: int) -> bool:
        engine = self.admin.get(f"/v1/management/engines/{self.ids[0]}").json()
        return engine["state"] == "ready" and engine["pid"] not in (None, pid)


async def _streams(
    server: Server, instances: Workers | Engines, args: argparse.Namespace, kill: bool
) -> tuple[list[Stream], float | None]:
    streams = [Stream() for _ in range(args.streams)]
    recovery: float | None = None
    limits = httpx.Limits(max_connections=args.streams + 8)
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=STREAM_TIMEOUT_S, limits=limits) as client,
        trio.open_nursery() as nursery,
    ):
        for i, stream in enumerate(streams):
            prompt = f"Request {i}: tell me about rivers."
            nursery.start_soon(_stream, client, prompt, instances.model, args.max_tokens, stream)
        if kill:
            while sum(s.first_token_s is not None for s in streams) < len(streams) // 2 and not all(
                s.ends for s in streams
            ):
                await trio.sleep(0.05)
            pid = instances.victim()
            os.kill(pid, signal.SIGKILL)
            progress(f"killed pid {pid}", "faults")
            struck = time.monotonic()
            while time.monotonic() - struck < READY_TIMEOUT_S:
                if await instances.back(client, pid):
                    recovery = time.monotonic() - struck
                    break
                await trio.sleep(0.1)
    return streams, recovery


async def _stream(client: httpx.AsyncClient, prompt: str, model: str | None, max_tokens: int, out: Stream) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0}
    if model is not None:
        body["model"] = model
    sent = time.monotonic()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                out.ends.append(f"{reply.status_code} {json.loads(await reply.aread())['error']['code']}")
                return
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    out.ends.append(event["error"]["code"])
                    continue
                choice = event["choices"][0]
                out.text += choice["text"]
                if out.first_token_s is None:
                    out.first_token_s = time.monotonic() - sent
                if choice["finish_reason"]:
                    out.ends.append(choice["finish_reason"])
    except httpx.HTTPError as error:
        out.ends.append(f"transport {type(error).__name__}")
    out.e2e_s = time.monotonic() - sent


def _resumed(metrics: str) -> int:
    return int(sum(float(count) for count in RESUMED.findall(metrics)))


def _summary(
    name: str, streams: list[Stream], reference: list[Stream] | None, resumed: int, recovery: float | None
) -> Run:
    ends = [s.ends for s in streams]
    completed = sum(e == ["length"] for e in ends)
    e2e = np.array([s.e2e_s for s in streams if s.ends == ["length"]] or [0.0])
    added = None
    if reference is not None:
        pairs = [(s.e2e_s, r.e2e_s) for s, r in zip(streams, reference) if s.ends == ["length"] and r.e2e_s]
        added = max((a - b for a, b in pairs), default=None)
    return Run(
        name=name,
        streams=len(streams),
        completed=completed,
        failed=tally([x for e in ends for x in e if x != "length"]) or "none",
        lost=lost_count(ends, {"length", "instance_lost", "unavailable", "timeout"}),  # the rest: clear errors
        resumed=resumed,
        same_text=None
        if reference is None
        else sum(s.ends == ["length"] and s.text == r.text for s, r in zip(streams, reference)),
        e2e_p50_s=round(float(np.percentile(e2e, 50)), 2),
        e2e_p99_s=round(float(np.percentile(e2e, 99)), 2),
        most_added_s=None if added is None else round(added, 2),
        recovery_s=None if recovery is None else round(recovery, 1),
    )


def markdown(runs: list[Run]) -> str:
    lines = [
        "| run | completed | failed | lost | resumed | same text as no fault | e2e p50 / p99 s | most added s "
        "| worker back in s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        same = "(reference)" if r.same_text is None else f"{r.same_text}/{r.completed}"
        added = "" if r.most_added_s is None else f"{r.most_added_s:.1f}"
        back = "" if r.recovery_s is None else f"{r.recovery_s:.1f}"
        lines.append(
            f"| {r.name} | {r.completed}/{r.streams} | {r.failed} | {r.lost} | {r.resumed} | {same} | "
            f"{r.e2e_p50_s:.1f} / {r.e2e_p99_s:.1f} | {added} | {back} |"
        )
    return "\n".join(lines)


def plot(runs: list[Run], path: Path, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (counts, latency) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.name.replace(", ", "\n") for r in runs]
    x = np.arange(len(runs))
    counts.bar(x - 0.2, [r.completed for r in runs], 0.4, label="completed")
    counts.bar(x + 0.2, [r.streams - r.completed for r in runs], 0.4, label="failed or lost")
    counts.set_xticks(x, names, fontsize=8)
    counts.set_ylabel("streams")
    counts.legend()
    latency.bar(x - 0.2, [r.e2e_p50_s for r in runs], 0.4, label="e2e p50")
    latency.bar(x + 0.2, [r.e2e_p99_s for r in runs], 0.4, label="e2e p99")
    latency.set_xticks(x, names, fontsize=8)
    latency.set_ylabel("seconds (completed streams)")
    latency.legend()
    fig.suptitle(f"One of three engine workers killed mid-run\n{cpu[:110]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
