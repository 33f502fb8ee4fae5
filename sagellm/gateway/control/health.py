"""Health checks of the servers the control plane reaches over HTTP (`openai` engines: vLLM, llama.cpp, another
sageLLM; and the vllm, sglang and llamacpp servers it started, `server_process`): ready whenever `/v1/models`
answers, unhealthy while it does not, and how many requests wait at the server, from its Prometheus metrics. Engines
of ours are workers of the gateway's graph (`engine_link`), watched by their heartbeats; they and the servers started
here are restarted by the one supervision loop."""

from __future__ import annotations

import re

import httpx
import structlog
import trio

from sagellm.gateway.control.engine_spec import READY, UNHEALTHY, ManagedEngine

log = structlog.get_logger("sagellm.gateway")

# The gauge of queued requests in the Prometheus text of vLLM, llama.cpp, SGLang and sageLLM servers.
WAITING = re.compile(
    r"^(?:vllm:num_requests_waiting|llamacpp:requests_deferred|sglang:num_queue_reqs|sagellm:num_requests_waiting)"
    r"(?:\{[^}]*\})? (\S+)$",
    re.MULTILINE,
)
HEALTH_PATH = "/v1/models"


class HealthChecks:
    def __init__(self, client: httpx.AsyncClient, *, health_interval_s: float = 5.0, startup_timeout_s: float = 600.0):
        """`startup_timeout_s`: how long a server may take to answer at first."""
        self._client = client
        self.health_interval_s, self.startup_timeout_s = health_interval_s, startup_timeout_s

    async def answers(self, engine: ManagedEngine) -> bool:
        """Whether the server's `/v1/models` answers 200 now."""
        try:
            reply = await self._client.get(engine.url + HEALTH_PATH, headers=_auth(engine), timeout=5)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    async def probe(self, engine: ManagedEngine) -> bool:
        """Checks the engine's health now (what the periodic check does), moving it between ready and unhealthy."""
        ok = await self.answers(engine)
        if engine.state in (READY, UNHEALTHY) and not engine.stopping:
            engine.state = READY if ok else UNHEALTHY
        return ok

    async def _until_ready(self, engine: ManagedEngine) -> None:
        """Returns once the check passes (or the engine is being stopped)."""
        while not engine.stopping and not await self.answers(engine):
            await trio.sleep(0.25)

    async def watch(self, engine: ManagedEngine) -> None:
        """Every `health_interval_s`, until the engine stops: ready while the check passes, unhealthy while it fails.
        An engine starting (again) or failed is left as it is: that is its supervisor's to say (a server started
        here)."""
        while True:
            await trio.sleep(self.health_interval_s)
            if engine.stopping:
                return
            ok = await self.answers(engine)
            if engine.stopping:
                return
            if engine.state in (READY, UNHEALTHY):
                if ok != (engine.state == READY):
                    log.warning("engine_health", engine=engine.id, healthy=ok)
                engine.state = READY if ok else UNHEALTHY
            if ok and engine.stats is not None:
                engine.stats.waiting = await self._waiting(engine)

    async def _waiting(self, engine: ManagedEngine) -> int:
        """Requests waiting at the server, from its Prometheus metrics (vLLM's, llama.cpp's, SGLang's or ours); 0
        where it exposes none. Requests running there are counted by the gateway itself, which sent them."""
        try:
            reply = await self._client.get(engine.url + "/metrics", headers=_auth(engine), timeout=5)
        except httpx.HTTPError:
            return 0
        if reply.status_code != 200:
            return 0
        return round(sum(float(value) for value in WAITING.findall(reply.text)))

    async def watch_remote(self, engine: ManagedEngine) -> None:
        """An openai engine is not ours to restart: it is ready whenever its `/v1/models` answers."""
        with trio.move_on_after(self.startup_timeout_s):
            await self._until_ready(engine)
            if engine.stopping:
                return
            engine.state, engine.ever_ready = READY, True
        if not engine.ever_ready:
            engine.state, engine.last_error = UNHEALTHY, f"{engine.url}/v1/models does not answer 200"
        await self.watch(engine)


def _auth(engine: ManagedEngine) -> dict[str, str]:
    """The engine's own key (a managed process gets a fresh one; an openai server the one registered with it)."""
    return {"authorization": f"Bearer {engine.api_key}"} if engine.api_key else {}
