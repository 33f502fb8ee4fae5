"""Whether the gateway's port is taken, asked before anything loads: `sagellm serve` and `sagellm gateway start` check
it first and say so in one line, rather than load a model for a minute and then fail to listen. The server's own bind
raises the same error, for a port taken between the check and the bind."""

from __future__ import annotations

import errno
import socket

from sagellm.common.errors import InvalidInput


class PortInUse(InvalidInput):
    """Another process listens on the port the gateway was told to use; the message says how to pick another."""

    def __init__(self, port: int) -> None:
        super().__init__(f"port {port} is in use; pick another with --port (0: any free port)")
        self.port = port


def check_port_free(host: str, port: int) -> None:
    """Raises PortInUse when the gateway could not listen at `host`:`port` now, bound as its server binds (every
    address `host` names, SO_REUSEADDR: a port whose last connections wait out TIME_WAIT is free). Port 0 (any free
    one), a host that does not resolve and any other bind error pass: the server's own bind says what is wrong."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise PortInUse(port) from None
