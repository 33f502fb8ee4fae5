"""`sagellm api-server`: answer a gateway's HTTP on this host, in front of its serving core on another one.

    sagellm serve smollm2-135m-instruct --api-hub 0.0.0.0:7100     # on the core's host: prints the command below
    sagellm api-server --core tcp://core-host:7100 --key-file K --host 0.0.0.0   # on each front-end host

The API server does HTTP, JSON, the chat template and tokenizing here, and sends the core requests ready to run; every
other route (models, health, metrics, admin, sessions) is answered by the core over the same link. The gateway's API
keys and limits come from the core. The link is encrypted and the core admits only processes holding the key it made
for the run: copy the key file it names here over a secure channel (scp -p) first. If the core falls silent, requests
in flight end with an error and new ones get a 503 until it is back. Ctrl-C or SIGTERM stop it gracefully."""

from __future__ import annotations

import argparse
from pathlib import Path

from sagellm.gateway.config import DEFAULT_PORT


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "api-server",
        help="answer a gateway's HTTP on this host, in front of its core on another",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--core", required=True, metavar="tcp://HOST:PORT", help="the core's hub (its --api-hub)")
    p.add_argument("--key-file", type=Path, required=True, help="the run's key, copied from the core's host")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the port to listen on (default {DEFAULT_PORT})")
    p.add_argument(
        "--allowed-host",
        action="append",
        dest="allowed_hosts",
        metavar="NAME",
        help="a host name clients may address this server by (repeat; default: loopback names on 127.0.0.1, any "
        "elsewhere)",
    )
    p.add_argument("--log-level", default="info", help="debug, info, warning or error (default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import trio

    from sagellm.gateway.api_servers.server import run_api_server
    from sagellm.gateway.config import GatewayConfig
    from sagellm.runtime.comm.curve import RunKeys

    keys = RunKeys.read(args.key_file)
    allowed = GatewayConfig(host=args.host, allowed_hosts=args.allowed_hosts).host_names()
    settings = {"host": args.host, "port": args.port, "allowed_hosts": sorted(allowed) if allowed else None}
    trio.run(run_api_server, args.core, settings, keys)
    return 0
