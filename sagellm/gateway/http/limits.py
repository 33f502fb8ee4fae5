"""What the gateway's HTTP server allows a client: sizes, times and connections (`HttpLimits`, and the fixed bounds
beside it)."""

from __future__ import annotations

import resource
from dataclasses import dataclass

from sagellm.common.errors import InvalidInput

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; more is a 431
READ_BYTES = 64 * 1024
KEEP_ALIVE_TIMEOUT_S = 75.0  # as long as common proxies keep theirs (nginx: 75 s): a pooled connection is not cut
BODY_TIMEOUT_S = 30.0  # a head or body still arriving after this is given up: a slow client cannot hold a request
FD_HEADROOM = 256  # descriptors kept for what else the process opens: engine, ZeroMQ sockets, logs, files
MIN_CONNECTIONS = 64  # the derived cap never goes below this, however low the descriptor limit
# Nor above this: a connection costs ~8 KB of Python objects (tasks, buffer), so a million (Docker's usual descriptor
# limit) would trade running out of descriptors for running out of memory. More is `max_connections`, given.
MAX_DERIVED_CONNECTIONS = 65_536
MAX_FD_TARGET = 1 << 20  # Linux's default `nr_open`: the soft limit asked for when the hard one is unlimited


@dataclass
class HttpLimits:
    """`max_connections`: how many connections the server holds at once (beyond, a new one is answered 503 and
    closed); None derives it when the server starts (`connection_cap`)."""

    max_body_bytes: int
    body_timeout_s: float = BODY_TIMEOUT_S  # also the header timeout: a new connection's first head must arrive in it
    keep_alive_timeout_s: float = KEEP_ALIVE_TIMEOUT_S
    graceful_timeout_s: float = 30.0
    max_connections: int | None = None

    def __post_init__(self) -> None:
        if self.max_connections is not None and self.max_connections < 1:
            raise InvalidInput(f"max_connections must be at least 1, not {self.max_connections}")


def connection_cap(limits: HttpLimits, fd_limit: int) -> int:
    """The most connections the server holds: `limits.max_connections` if given, else the `fd_limit` descriptors the
    process may open less `FD_HEADROOM`, within `MIN_CONNECTIONS` and `MAX_DERIVED_CONNECTIONS`."""
    if limits.max_connections is not None:
        return limits.max_connections
    return min(MAX_DERIVED_CONNECTIONS, max(MIN_CONNECTIONS, fd_limit - FD_HEADROOM))


def raise_fd_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit and returns the soft limit now in force.

    Why: the soft limit is commonly 1024, kept low for programs that still use `select()` (whose fd set stops at
    1024); systemd's guidance is that a program that does not use it raises its own soft limit to the hard one, as
    Go's runtime and nginx's `worker_rlimit_nofile` do. This process waits with epoll (trio) and ZeroMQ's poller, so
    the higher limit is only more room for connections. A limit the kernel refuses (macOS caps it below an unlimited
    hard limit) is left as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_FD_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return MAX_FD_TARGET if soft == resource.RLIM_INFINITY else soft
