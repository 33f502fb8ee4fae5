"""The gateway's process with API servers in front (`sagellm serve --api-servers N`, `--api-hub HOST:PORT`): the hub
they attach to, the processes on the gateway's port, and for API servers on other hosts the run's key and how to
start one there."""

from __future__ import annotations

import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
import trio
import zmq

from sagellm.common.errors import InvalidInput
from sagellm.common.home import keys_dir
from sagellm.gateway.api_servers.hub import ApiServerHub, run_api_servers
from sagellm.gateway.config import GatewayConfig
from sagellm.runtime.comm.curve import RunKeys, authenticator
from sagellm.runtime.comm.zmq_trio import local_endpoint
from sagellm.runtime.pipeline.spec import WILDCARD_HOST

log = structlog.get_logger("sagellm.gateway")


async def serve_with_hub(
    hub: ApiServerHub,
    own_http: Callable[..., Awaitable[None]],
    config: GatewayConfig,
    count: int,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """The gateway with API servers: the hub they attach to (ipc, or tcp at `config.api_hub` for API servers on
    other hosts too, encrypted with a key made here), and on the gateway's port `count` API server processes, or
    with none this process's own HTTP (`own_http`); hands the port's URL to `task_status`. On `stop` the HTTP front
    ends stop first (requests in flight finish here), then the hub."""
    zctx = zmq.Context()
    keys = RunKeys.generate() if config.api_hub else None
    key_file: Path | None = None
    try:
        with authenticator(zctx, keys):
            hub_scope = trio.CancelScope()
            async with trio.open_nursery() as nursery:

                async def run_hub(task_status: trio.TaskStatus) -> None:
                    with hub_scope:
                        await hub.run(zctx, _host_port(config.api_hub), keys, task_status=task_status)

                endpoint = await nursery.start(run_hub)
                if keys is not None:
                    hub.key_file = key_file = _announce_hub(endpoint, keys)
                async with trio.open_nursery() as front:  # returns once `stop` was set and the front ends ended
                    if count:
                        url = await front.start(
                            run_api_servers, hub, local_endpoint(endpoint), config, count, stop, keys
                        )
                    else:
                        url = await front.start(own_http)
                    task_status.started(url)
                hub_scope.cancel()
    finally:
        if key_file is not None:
            key_file.unlink(missing_ok=True)  # the key dies with the run
        zctx.term()


def _host_port(value: str | None) -> tuple[str, int] | None:
    """`api_hub`'s HOST:PORT (a bare PORT: loopback)."""
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise InvalidInput(f"--api-hub: expected HOST:PORT (port 0: any free one), got {value!r}")
    return host or "127.0.0.1", int(port)


def _announce_hub(endpoint: str, keys: RunKeys) -> Path:
    """Writes the run's key for API servers on other hosts (a file only its owner can read) and says, on stderr,
    how to start one."""
    port = endpoint.rpartition(":")[2]
    key_file = keys_dir() / f"api-hub-{port}.key"
    keys.write(key_file)
    host = endpoint.removeprefix("tcp://").rpartition(":")[0]
    core = f"tcp://{socket.gethostname() if host == WILDCARD_HOST else host}:{port}"
    log.info("api_hub_listening", endpoint=endpoint, key_file=str(key_file))
    print(
        f"sagellm: API servers on other hosts attach here: copy {key_file} to the host over a secure channel "
        f"(scp -p) and run there: sagellm api-server --core {core} --key-file {key_file} --host 0.0.0.0",
        file=sys.stderr,
        flush=True,
    )
    return key_file
