"""An API server: a process in front of a gateway's serving core, started by the gateway (`sagellm serve
--api-servers N`, sharing its port) or by hand on another host (`sagellm api-server --core tcp://HOST:PORT`).

API servers do the work that grows with the request rate and not with the model: HTTP, JSON, the chat template and
tokenizing, SSE framing. The core (`api_hub`) runs the graph. The OpenAI generation routes (`/v1/completions`,
`/v1/chat/completions`, `/v1/embeddings`) are answered here by the same code as in a single-process gateway, against
`RemoteCore`: requests go to the core tokenized, their items come back in batches. Every other route (models,
health, metrics, admin, management, sessions, request status) is passed on over the same link to the core's own app
(`CoreCalls`), so it answers from the one state there is: metrics count the requests of every API server.

The gateway starts its own as `python -m sagellm.gateway.api_servers.server --core ENDPOINT`, their settings in the
environment (`SAGELLM_API_SERVER`, JSON, and the run's key when the core listens on tcp: keys do not show in a
process listing); they end with the gateway, within a second even when it is killed outright
(`common.parent_death`): an API server must not answer for a core that is gone. The gateway's API keys, body limit
and graceful stop come from the core when an API server attaches."""

from __future__ import annotations

import argparse
import json
import os
import signal
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
import trio
import zmq

from sagellm.common import tracing
from sagellm.common.errors import Unavailable
from sagellm.common.logging import configure_logging
from sagellm.common.parent_death import exit_with_parent
from sagellm.gateway.api_servers.link import (
    API_SERVER,
)
from sagellm.gateway.api_servers.remote_core import CoreCalls, CoreLink, RemoteCore
from sagellm.gateway.http.app import App, Guard, HttpRequest
from sagellm.gateway.http.limits import HttpLimits
from sagellm.gateway.http.server import serve_http
from sagellm.gateway.keys.key_ring import KeyRing
from sagellm.gateway.media import media_policy
from sagellm.gateway.openai.api import OpenAIApi
from sagellm.runtime.comm import wire
from sagellm.runtime.comm.curve import RunKeys
from sagellm.runtime.comm.zmq_trio import connect_dealer, reclaim_ipc_dirs

if TYPE_CHECKING:
    from sagellm.runtime.pipeline.served_model import ServedModel

log = structlog.get_logger("sagellm.gateway.api_servers.server")
SETTINGS_ENV = "SAGELLM_API_SERVER"
START_TIMEOUT_S = 60.0  # for the core's first answer


async def run_api_server(
    core_endpoint: str, settings: dict[str, Any], keys: RunKeys | None = None, *, by_gateway: bool = False
) -> None:
    """Attaches to the core, loads the tokenizer of its model, serves HTTP until SIGTERM (and, one started by hand,
    Ctrl-C; `by_gateway`: the gateway stops its own in order), then stops gracefully: requests in flight finish.
    Stopped while it starts, it just ends. `settings`: where it listens (`host`, `port`, `allowed_hosts`); `keys`:
    the core's run key (a tcp core is CURVE-encrypted)."""
    zctx = zmq.Context()
    try:
        with connect_dealer(zctx, core_endpoint, keys=keys) as socket:
            link = CoreLink(socket)
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                starting = trio.CancelScope()

                async def end_start_on_stop() -> None:
                    await stop.wait()
                    starting.cancel()

                nursery.start_soon(link.run)
                nursery.start_soon(_stop_on_signal, stop, by_gateway)
                nursery.start_soon(end_start_on_stop)
                with starting:
                    link.attach()
                    with trio.fail_after(START_TIMEOUT_S):
                        await link.snapshot_arrived.wait()
                    assert link.snapshot is not None
                    served = await trio.to_thread.run_sync(_served, link.snapshot.model_path)
                if not starting.cancelled_caught:
                    await _serve(link, served, settings, stop)
                nursery.cancel_scope.cancel()
    except trio.TooSlowError:
        raise ApiServerError(f"the serving core at {core_endpoint} did not answer within {START_TIMEOUT_S:.0f} s "
                             "(not running, unreachable, or another run's key)") from None  # fmt: skip
    finally:
        zctx.term()


class ApiServerError(Unavailable):
    """An API server that cannot serve (its core does not answer)."""


async def _serve(link: CoreLink, served: ServedModel | None, settings: dict[str, Any], stop: trio.Event) -> None:
    assert link.snapshot is not None
    front_end = link.snapshot.front_end
    limits = HttpLimits(max_body_bytes=front_end.max_body_bytes, graceful_timeout_s=front_end.graceful_timeout_s,
                        max_connections=front_end.max_connections)  # fmt: skip
    serving = partial(serve_http, _app(link, served, settings), settings["host"], settings["port"], limits,
                      shutdown_trigger=stop.wait, reuse_port=True)  # fmt: skip
    async with trio.open_nursery() as http:
        url = await http.start(serving)
        link.url = url
        link.send(wire.Ready(node=API_SERVER, pid=os.getpid(), info={"url": url}))
        log.info("api_server_ready", url=url)


def _app(link: CoreLink, served: ServedModel | None, settings: dict[str, Any]) -> App:
    assert link.snapshot is not None
    allowed = settings.get("allowed_hosts")
    app = App(allowed_hosts=frozenset(allowed) if allowed is not None else None)
    to_core = CoreCalls(link)
    front = link.snapshot.front_end
    routes = OpenAIApi(
        RemoteCore(link, served),
        to_core=to_core,
        tool_call_parser=front.tool_call_parser,
        reasoning_parser=front.reasoning_parser,
        reasoning_budget=front.reasoning_budget,
        media=media_policy(front.allowed_media_domains, front.allowed_local_media_path),
        per_request_metrics=front.per_request_metrics,
    )
    routes.register(app, _key_guard(link))
    app.fallback = to_core
    return app


def _key_guard(link: CoreLink) -> Guard | None:
    """The API routes' guard: the core's keys as its latest snapshot gives them (a reloaded keys file's too)."""
    assert link.snapshot is not None
    if not link.snapshot.front_end.keys_required:
        return None
    ring = KeyRing([], required=True)

    def guard(request: HttpRequest) -> None:
        assert link.snapshot is not None
        keys = link.snapshot.front_end.keys
        if keys is not ring.keys:  # a new snapshot
            ring.replace(keys)
        ring.guard(request)

    return guard


def _served(model_path: str | None) -> ServedModel | None:
    """The graph's model's front-end files (tokenizer, config) as this process reads them."""
    if model_path is None:
        return None
    from sagellm.runtime.pipeline.served_model import served_model

    return served_model({"model": model_path})


async def _stop_on_signal(stop: trio.Event, by_gateway: bool) -> None:
    """SIGTERM stops this server gracefully. A terminal's Ctrl-C goes to the gateway too, which stops its API servers
    in order (`main` ignores SIGINT); one started by hand stops at Ctrl-C."""
    with trio.open_signal_receiver(signal.SIGTERM, *(() if by_gateway else (signal.SIGINT,))) as signals:
        async for _ in signals:
            break
    stop.set()


def settings_of(config: Any, port: int) -> dict[str, Any]:
    """Where an API server the gateway starts listens (sent through the environment)."""
    allowed = config.host_names()
    return {"host": config.host, "port": port, "allowed_hosts": sorted(allowed) if allowed is not None else None}


def main() -> None:
    """The entry the gateway spawns (its settings and the run's key in the environment)."""
    exit_with_parent(reclaim_ipc_dirs)  # first: a gateway killed outright takes its API servers along
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--core", required=True, help="the serving core's ZeroMQ endpoint")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(os.environ.get("SAGELLM_LOG_LEVEL", "info"))
    tracing.configure_from_env("sagellm-api-server")
    settings, keys = json.loads(os.environ[SETTINGS_ENV]), RunKeys.from_env()
    trio.run(partial(run_api_server, by_gateway=True), args.core, settings, keys)


if __name__ == "__main__":
    main()
