"""A managed replica of the gateway's own model is a worker the gateway's executor hosts, not a second gateway: each
of its requests passes the gateway's one admission (counted per request id), its one executor and ledger, then only
its engine; its greedy answers are the graph engine's (same weights); killed, the one supervision loop starts it
again and it serves again; stopped, it ends, its process with it, and nothing of it is left in the gateway's run. A
reply that arrives as its client leaves is dropped, and the link serves on. The link mirrors its worker's restarts
and load the moment they happen, woken by them, not by a poll."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import SimpleNamespace

import httpx
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from sagellm.common.pulse import Pulse
from sagellm.common.restart import RestartPolicy
from sagellm.common.supervision import Supervised, Supervision
from sagellm.gateway.control.engine_link import EngineLink
from sagellm.gateway.control.engine_spec import READY, STARTING, EngineSpec, ManagedEngine
from sagellm.runtime.executor.ledger import RequestLedger
from sagellm.runtime.pipeline.messages import Request, TokenDelta
from sagellm.runtime.pipeline.operator import InstanceStats
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config

ENGINES = "/v1/management/engines"
PROMPTS = [f"Count to {n}:" for n in range(12)]


class Hosts:
    """The link's worker and the gateway's executor, as far as a stream reaches them: requests sent to the worker
    (none answered), and those its end tells the worker to cancel."""

    def __init__(self) -> None:
        self.group, self.cancelled = "g", []
        self.control = self

    async def send(self, request: Request) -> None:
        pass

    def cancel(self, request_ids: list[str], group_only: str | None = None) -> None:
        assert group_only == "g"
        self.cancelled += request_ids


def test_a_reply_arriving_as_its_client_leaves_is_dropped_and_the_link_serves_on():
    """The worker's replies reach `_deliver` from the executor's tasks at any moment; while a stream closes (its
    client left after the first token) none may find its channel closed but still registered: that error would end
    the whole link (every request on it lost). Replies keep arriving while each of 64 streams closes (trio orders
    the two tasks differently from one close to the next)."""

    async def main() -> None:
        link = EngineLink.__new__(EngineLink)  # its request path alone: no worker
        hosts = Hosts()
        link._streams, link._stopping, link.done, link.hosted, link.executor = {}, False, trio.Event(), hosts, hosts
        for n in range(64):
            rid = f"r{n}"
            stream = link.stream(Request(request_id=rid, prompt="hi"))
            first: list[TokenDelta] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_append, first, stream.__anext__())
                await wait_all_tasks_blocked()  # the stream is open and waits for its worker's replies
                link._deliver(TokenDelta(request_id=rid, token_ids=[1]))
            assert first[0].token_ids == [1]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.aclose)
                for token in range(2, 6):
                    link._deliver(TokenDelta(request_id=rid, token_ids=[token]))
                    await trio.sleep(0)
        assert link._streams == {} and hosts.cancelled == [f"r{n}" for n in range(64)]

    trio.run(main)


async def _append(items: list, awaitable) -> None:
    items.append(await awaitable)


class Worker(Supervised):
    """A replica's worker as its supervision sees it: serving until the test loses it."""

    name = "engine e1"

    def __init__(self) -> None:
        self.lost = trio.Event()

    async def until_lost(self) -> str:
        await self.lost.wait()
        return "killed by SIGKILL"


async def test_the_link_mirrors_a_restart_and_a_heartbeat_the_moment_they_happen(mock_clock):
    """The replica's state and load follow its worker's on the events that say they changed: the clock stands still
    here, so a link that looked again only after a sleep (it polled every 0.25 s) would never see either change."""
    worker = Worker()
    supervision = Supervision(worker, RestartPolicy(backoff_base_s=1.0, jitter=0))
    link = EngineLink.__new__(EngineLink)  # its following alone: no graph, no process
    link.engine = engine = ManagedEngine("e1", EngineSpec(model="m"), "", None, stats=InstanceStats(name="e1"))
    hosted = SimpleNamespace(group="g", supervision=supervision, stats={}, heard=Pulse())  # as the executor hosts it
    link.hosted, link.executor = hosted, SimpleNamespace(processes={})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(supervision.run, ready=True))
        await wait_all_tasks_blocked()  # (the executor starts its supervision before its link follows it)
        nursery.start_soon(link._follow, hosted)
        await wait_all_tasks_blocked()
        assert engine.state == READY and engine.stats is not None and engine.stats.waiting == 0

        hosted.stats = {**dataclasses.asdict(InstanceStats(name="e1")), "waiting": 3}  # a heartbeat's stats
        hosted.heard.fire()
        await wait_all_tasks_blocked()
        assert engine.stats.waiting == 3

        worker.lost.set()  # its process died: the supervision restarts it after its backoff
        await wait_all_tasks_blocked()
        assert (engine.state, engine.restarts, engine.last_error) == (STARTING, 1, "killed by SIGKILL")
        assert engine.stats.recovering and not engine.stats.healthy
        assert trio.current_time() == 0  # no time passed: each change was seen at once
        nursery.cancel_scope.cancel()


def _wait(admin: httpx.Client, engine_id: str, ready, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        engine = admin.get(f"{ENGINES}/{engine_id}").json()
        if ready(engine):
            return engine
        time.sleep(0.2)
    raise AssertionError(f"engine {engine_id} did not get there: {engine}")


def _complete(url: str, prompt: str) -> dict:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.slow
def test_a_replica_is_a_worker_of_the_graph_whose_requests_pass_one_admission(tiny_model, tmp_path, monkeypatch):
    graph = GRAPHS / "colocated.yaml"
    ledgers: defaultdict[str, set[int]] = defaultdict(set)  # request id -> the ledgers in this process it passed
    observe = RequestLedger.observe

    def observed(ledger: RequestLedger, item) -> bool:
        ledgers[getattr(item, "request_id", "")].add(id(ledger))
        return observe(ledger, item)

    monkeypatch.setattr(RequestLedger, "observe", observed)
    overrides = {"engine.max_num_seqs": 2, "engine.kv_cache_memory_gb": 0.05}
    with running_gateway(graph, tiny_config(tmp_path), tiny_model, **overrides) as gw:
        core = gw.gateway.core
        admission = core.local.operators["admission"]
        admitted: Counter[str] = Counter()
        execute = admission.execute

        def counted(item):
            admitted[item.request_id] += 1
            return execute(item)

        admission.execute = counted  # the gateway's own admission, counting what passes it
        headers = {"authorization": f"Bearer {gw.gateway.admin_key}"}
        with httpx.Client(base_url=gw.url, headers=headers, timeout=60) as admin:
            body = {"model": str(tiny_model), "served_model_name": core.model_name,
                    "engine": {"max_num_seqs": 4, "kv_cache_memory_gb": 0.05}}  # fmt: skip
            started = admin.post(ENGINES, json=body)
            assert started.status_code == 201, started.text
            replica = _wait(admin, started.json()["id"], lambda e: e["state"] == "ready")
            link = gw.gateway.engines.engines[replica["id"]].link
            assert link is not None and replica["pid"] is not None and replica["url"] == ""
            in_worker = {n.op for n in link.graph.nodes.values() if n.placement != "task"}
            assert in_worker == {"engine"}  # no admission, no queue, no route of its own
            with_port = admin.post(ENGINES, json={**body, "port": 18123})  # it listens on none: refused, not ignored
            assert with_port.status_code == 400 and "unknown field `port`" in with_port.json()["error"]["message"]

            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                replies = list(pool.map(lambda p: _complete(gw.url, p), PROMPTS))
            served_by = Counter(core.request_status(r["id"], "")["instance"] for r in replies)
            assert served_by[replica["id"]] > 0 and served_by["engine"] > 0, served_by
            assert sorted(admitted) == sorted(r["id"] for r in replies) and set(admitted.values()) == {1}
            on_replica = [r["id"] for r in replies if core.request_status(r["id"], "")["instance"] == replica["id"]]
            assert link.executor is core.executor  # the gateway's one executor hosts the replica's worker
            assert all(ledgers[rid] == {id(core.local.ledger)} for rid in on_replica), ledgers  # and one ledger
            alone = [_complete(gw.url, p) for p in PROMPTS]  # one at a time: each on whichever is free
            assert [r["choices"][0]["text"] for r in replies] == [r["choices"][0]["text"] for r in alone]

            os.kill(replica["pid"], signal.SIGKILL)  # the worker dies: its supervision starts it again
            again = _wait(admin, replica["id"], lambda e: e["restarts"] == 1 and e["state"] == "ready")
            assert again["pid"] not in (None, replica["pid"]) and "killed by SIGKILL" in again["last_error"]
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                replies = list(pool.map(lambda p: _complete(gw.url, p), PROMPTS))
            assert Counter(core.request_status(r["id"], "")["instance"] for r in replies)[replica["id"]] > 0

            assert admin.delete(f"{ENGINES}/{replica['id']}").json()["state"] == "stopped"
            hosts = core.executor  # nothing of the replica is left in the gateway's run
            assert not hosts.hosted.groups and replica["id"] not in {**hosts.processes, **hosts.supervisions}
            assert replica["id"] not in {**hosts.control.workers, **hosts.bridge.pushes, **hosts.bridge.groups}
            with pytest.raises(ProcessLookupError):
                for _ in range(100):  # reaped by its executor once stopped
                    os.kill(again["pid"], 0)
                    time.sleep(0.1)


@pytest.mark.slow
def test_a_replica_whose_worker_cannot_start_fails_alone_with_its_cause(tiny_model, tmp_path):
    """A replica's worker that fails before it is ready (here its model is not there) fails that engine at once, with
    the worker's cause and where its log is; the gateway's own engine serves on, and nothing is restarted."""
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path), tiny_model) as gw:
        headers = {"authorization": f"Bearer {gw.gateway.admin_key}"}
        with httpx.Client(base_url=gw.url, headers=headers, timeout=60) as admin:
            body = {"model": str(tmp_path / "missing"), "served_model_name": gw.gateway.core.model_name}
            started = admin.post(ENGINES, json=body)
            assert started.status_code == 201, started.text
            failed = _wait(admin, started.json()["id"], lambda e: e["state"] == "failed")
            assert "before it was ready" in failed["last_error"] and "engine.log" in failed["last_error"]
            assert failed["restarts"] == 0 and failed["pid"] is None
            log = (gw.gateway.engines.engines[failed["id"]].link.log_file).read_text()
            assert "missing" in log  # the worker's own error, in its log
            assert _complete(gw.url, "Still here?")["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
def test_an_engine_of_another_model_is_a_worker_too_and_its_requests_are_tokenized_once_with_its_files(tmp_path):
    """An llm engine of a model other than the gateway's (another architecture, other weights) is a worker of the
    gateway's graph as well: the gateway reads that model's files (no weights) so its one admission tokenizes and
    checks the requests for it, a chat through its chat template; its greedy answers are the offline API's on that
    model, and an over-long prompt gets that model's context error at the gateway."""
    from sagellm import LLM, SamplingParams
    from tests.tiny_models import make_tiny_llama, make_tiny_qwen2

    own, other = make_tiny_llama(tmp_path / "own"), make_tiny_qwen2(tmp_path / "other", seed=7)
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path), own) as gw:
        admission = gw.gateway.core.local.operators["admission"]
        headers = {"authorization": f"Bearer {gw.gateway.admin_key}"}
        with httpx.Client(base_url=gw.url, headers=headers, timeout=60) as admin:
            started = admin.post(ENGINES, json={"model": str(other), "served_model_name": "other"})
            assert started.status_code == 201, started.text
            engine = _wait(admin, started.json()["id"], lambda e: e["state"] == "ready")
            assert engine["pid"] is not None and "other" in admission.models  # its files, read at the gateway
            body = {"model": "other", "prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            reply = httpx.post(gw.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S)
            assert reply.status_code == 200, reply.text
            offline = LLM(str(other)).generate(["Hello there"], SamplingParams(max_tokens=8, temperature=0,
                                                                                 ignore_eos=True))  # fmt: skip
            assert reply.json()["choices"][0]["text"] == offline[0].outputs[0].text
            chat = {"model": "other", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            assert httpx.post(gw.url + "/v1/chat/completions", json=chat, timeout=REPLY_TIMEOUT_S).status_code == 200
            tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
            tools = httpx.post(gw.url + "/v1/chat/completions", json={**chat, "tools": [tool]}, timeout=60)
            assert tools.status_code == 400 and tools.json()["error"]["param"] == "tools"  # never shown unenforced
            long = {"model": "other", "prompt": "word " * 5000, "max_tokens": 4}
            refused = httpx.post(gw.url + "/v1/completions", json=long, timeout=REPLY_TIMEOUT_S)
            assert refused.status_code == 400 and "maximum context length" in refused.json()["error"]["message"]
            assert admin.delete(f"{ENGINES}/{engine['id']}").json()["state"] == "stopped"
            assert "other" not in admission.models  # forgotten with its last engine
