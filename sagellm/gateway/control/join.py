"""Joining another gateway as one of its instances: `sagellm serve ... --join http://head:8000`.

A server started on another host (or beside the head) registers itself with the head gateway's management API as an
`openai` engine reached at its own URL, under the name it serves; the head's route then chooses it among the
instances of that model (for the head's own model name: a replica beside the head's engines, its token ids asked for
so failover can resume requests on it exactly). Membership is kept, not assumed: the registration is retried with
backoff until the head answers, checked every `recheck_s`, and made again when the head forgot it because it restarted
(its `/health` names its run: `boot_id`); a head that still runs and forgot it was told to (`DELETE` by an admin), so
the server stops asking and serves on by itself.
Leaving is a drain: on SIGINT/SIGTERM the server first asks the head to stop it (the head sends nothing new and waits
for what it sent), then stops serving. A server that dies without leaving is the head's health checks' to find.

The head's admin key is what lets a server join (`--join-key`, or SAGELLM_JOIN_KEY); it is sent only to the head.
The URL it joins at must be in the head's `--allowed-upstream` (`control.upstreams`), as any `openai` engine's: a
joining server is not allowed implicitly, because its registration is a call like any other holder of the key could
make, naming a URL the head cannot tell from one that is not the caller's own (a metadata service, an internal port).
The operator who starts members knows where they run and lists those hosts or their network on the head once; a head
that refuses is said at once (JoinRefused), not retried.

A server with models on demand joins once for each model it serves (`Memberships`): the graph's own, if it has one,
and each model on demand, loaded or not; a request the head sends for one that is unloaded loads it here."""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx
import structlog
import trio

from sagellm.common.errors import JoinRefused
from sagellm.common.restart import RestartPolicy
from sagellm.gateway.config import JoinSettings

log = structlog.get_logger("sagellm.gateway.control.join")
ENGINES_PATH = "/v1/management/engines"


class Membership:
    """This server's registration at the head, from the first join to the leave."""

    def __init__(self, settings: JoinSettings, retry: RestartPolicy | None = None) -> None:
        self.settings = settings
        self.retry = retry or RestartPolicy(backoff_base_s=1.0, backoff_cap_s=30.0)
        self.engine_id: str | None = None  # the head's id for this server while joined
        self._headers = {"authorization": f"Bearer {settings.admin_key}"} if settings.admin_key else {}
        self._gateway = settings.gateway.rstrip("/").removesuffix("/v1")
        self._left = False
        self._boot_id: str | None = None  # the head's run this server joined

    async def run(self, listening: str, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Joins (retrying with backoff) as reached at the settings' URL, else at `listening` (this server's
        address), hands over once joined, then keeps the membership until cancelled or left. Raises JoinRefused if
        the head refuses the first registration (a wrong key, a name it cannot take)."""
        url = self.settings.url or listening
        async with httpx.AsyncClient(base_url=self._gateway, headers=self._headers, timeout=30.0) as client:
            await self._join(client, url)
            task_status.started()
            while not self._left:
                await trio.sleep(self.settings.recheck_s)
                if self._left or await self._still_known(client):
                    continue
                if await self._boot(client) == self._boot_id:
                    log.warning("removed_by_gateway", gateway=self._gateway, engine=self.engine_id)
                    self._left = True
                    return
                log.warning("rejoining_restarted_gateway", gateway=self._gateway, engine=self.engine_id)
                try:
                    await self._join(client, url)
                except JoinRefused as refused:  # this server keeps serving by itself; the first refusal stops it
                    log.error("rejoin_refused", gateway=self._gateway, error=str(refused))
                    self._left = True
                    return

    async def leave(self) -> None:
        """Asks the head to drain and forget this server; returns once it has (or could not be asked)."""
        if self._left or self.engine_id is None:
            self._left = True
            return
        self._left = True
        path = f"{ENGINES_PATH}/{self.engine_id}"
        log.info("leaving", gateway=self._gateway, engine=self.engine_id)
        try:
            async with httpx.AsyncClient(base_url=self._gateway, headers=self._headers) as client:
                reply = await client.delete(path, timeout=self.settings.drain_timeout_s)
            if reply.status_code not in (200, 404):
                log.warning("leave_refused", status=reply.status_code, body=reply.text[:300])
        except httpx.HTTPError as error:
            log.warning("leave_failed", gateway=self._gateway, error=f"{type(error).__name__}: {error}")
        log.info("left", gateway=self._gateway, engine=self.engine_id)

    async def _join(self, client: httpx.AsyncClient, url: str) -> None:
        """Registers this server, retrying with backoff while the head cannot be reached or is not ready; a refusal
        that retrying cannot change (a bad key, a bad field) is raised."""
        s = self.settings
        body: dict[str, Any] = {"kind": "openai", "model": s.model, "url": url, "api_key": s.api_key}
        body = {k: v for k, v in {**body, "label": s.label}.items() if v is not None}
        attempt = 0
        while True:
            attempt += 1
            try:
                self._boot_id = await self._boot(client)
                reply = await client.post(ENGINES_PATH, json=body)
                if reply.status_code == 201:
                    self.engine_id = reply.json()["id"]
                    log.info("joined", gateway=self._gateway, engine=self.engine_id, model=s.model, url=url)
                    return
                if reply.status_code not in (502, 503, 504):
                    raise JoinRefused(f"the gateway at {self._gateway} refused to add this server: {reply.text}")
                why = f"HTTP {reply.status_code}"
            except httpx.HTTPError as error:
                why = f"{type(error).__name__}: {error}"
            delay = self.retry.delay(min(attempt, 16))
            log.warning("join_retrying", gateway=self._gateway, attempt=attempt, delay_s=round(delay, 2), why=why)
            await trio.sleep(delay)

    @staticmethod
    async def _boot(client: httpx.AsyncClient) -> str | None:
        """The head's run, from its `/health` (raises httpx.HTTPError when it cannot be reached)."""
        reply = await client.get("/health")
        try:
            return reply.json().get("boot_id")
        except ValueError:
            return None

    async def _still_known(self, client: httpx.AsyncClient) -> bool:
        """False only when the head answers that it does not know this server; an unreachable head is asked again
        at the next check (it may be restarting)."""
        try:
            reply = await client.get(f"{ENGINES_PATH}/{self.engine_id}")
        except httpx.HTTPError:
            return True
        return reply.status_code != 404


class Memberships:
    """This server's registrations at the head, one for each model it serves, joined and left together."""

    def __init__(self, settings: JoinSettings) -> None:
        self.settings = settings
        self.each: list[Membership] = []

    async def run(
        self, listening: str, models: list[str], *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Joins as the server of each of `models` (the settings' model for the graph's own), hands over once all
        are joined, then keeps them until cancelled or left (`Membership.run`)."""
        self.each = [Membership(dataclasses.replace(self.settings, model=model)) for model in models]
        async with trio.open_nursery() as nursery:
            for membership in self.each:
                await nursery.start(membership.run, listening)
            task_status.started()

    async def leave(self) -> None:
        """Leaves the head for every model at once (each drained there)."""
        async with trio.open_nursery() as nursery:
            for membership in self.each:
                nursery.start_soon(membership.leave)
