"""Where an `openai` engine registered over the management API may be: the upstreams the operator allows
(`sagellm serve --allowed-upstream HOST[:PORT]`, repeated; none by default).

Such an engine is sent users' prompts under a model's name, and the gateway calls it (health checks, metrics), so its
address is the operator's to allow, never a request's: otherwise whoever holds the admin key could point the gateway
at a cloud's metadata service or an internal port, or take a served model's traffic. An entry is a host name, an IP
address or a network (`10.0.0.0/24`; IPv6 in brackets, `[fd00::/8]:8000`), with a port (only that one) or without
(any). Names are compared as written and never resolved, so no DNS answer widens the list, and an address spelled
another way (`2852039166`) is a name that no address entry matches. Link-local and metadata addresses (169.254.0.0/16,
fe80::/10, AWS's fd00:ec2::254, Alibaba's 100.100.100.200: where clouds hand out instance credentials) are allowed
only by an entry inside them, never by a wider network such as 0.0.0.0/0.

Engines the operator starts itself (a preset served with `--model NAME=PRESET`, the Python control plane's instances)
are not checked here: they are the operator's own word."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import httpx

from sagellm.common.errors import FieldError
from sagellm.gateway.http.errors import ApiError

Network = IPv4Network | IPv6Network
METADATA = tuple(ip_network(n) for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32"))
DEFAULT_PORTS = {"http": 80, "https": 443}
_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


@dataclass(frozen=True)
class Upstream:
    """One entry of the allow-list: a host name or a network, and a port (None: any)."""

    text: str  # as the operator wrote it
    name: str | None
    network: Network | None
    port: int | None

    @classmethod
    def parse(cls, entry: str) -> Upstream:
        """`HOST[:PORT]`; FieldError naming `--allowed-upstream` for anything else."""
        text = entry.strip()
        host, port = _host_and_port(text)
        network = _network(host)
        if network is not None:
            return cls(text, None, network, port)
        name = host.lower().rstrip(".")
        if not _NAME.fullmatch(name):
            raise FieldError("allowed_upstreams", f"--allowed-upstream takes HOST[:PORT] (a name, an address or a "
                                                  f"network such as 10.0.0.0/24), got {entry!r}")  # fmt: skip
        return cls(text, name, None, port)

    def allows(self, host: str, address: IPv4Address | IPv6Address | None, port: int) -> bool:
        """Whether a URL's `host` (lower-case, its IP `address` when it is one) and `port` are this entry's."""
        if self.port is not None and self.port != port:
            return False
        if address is None or self.network is None:
            return address is None and self.name == host
        if address.version != self.network.version or address not in self.network:
            return False
        metadata = [m for m in METADATA if address in m]  # reached only through an entry inside its range
        return not metadata or any(self.network.subnet_of(m) for m in metadata if m.version == self.network.version)


class UpstreamAllowList:
    """The operator's allow-list of upstreams; `check` refuses a request's URL outside it."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        """FieldError (naming `allowed_upstreams`) for an entry that is not HOST[:PORT]."""
        self.entries = [Upstream.parse(entry) for entry in entries]

    def allows(self, url: str) -> bool:
        parsed = httpx.URL(url)
        host = parsed.host.lower().rstrip(".")
        port = parsed.port or DEFAULT_PORTS.get(parsed.scheme, 0)
        return any(entry.allows(host, _address(host), port) for entry in self.entries)

    def check(self, url: str) -> None:
        """A 400 for a URL that is not a server's base URL, a 403 for one outside the allow-list (both name `url`)."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as error:
            raise ApiError(400, f"url {url!r} is not a valid URL: {error}", param="url") from None
        if parsed.userinfo or parsed.query or parsed.fragment or not parsed.host:
            raise ApiError(400, f"url must be a server's base URL, http(s)://HOST[:PORT][/PATH], without user info, "
                                f"query or fragment; got {url!r}", param="url")  # fmt: skip
        if not self.allows(url):
            allowed = ", ".join(entry.text for entry in self.entries) or "none"
            raise ApiError(403, f"url {url!r} is not an upstream this gateway allows (allowed: {allowed}); the "
                                "operator names where openai engines may be with `sagellm serve --allowed-upstream "
                                "HOST[:PORT]`", param="url", code="upstream_not_allowed")  # fmt: skip


def _host_and_port(entry: str) -> tuple[str, int | None]:
    """`HOST`, `HOST:PORT`, `[IPV6]` or `[IPV6]:PORT` (a bare IPv6 address or network takes no port)."""
    if entry.startswith("["):
        host, closed, rest = entry[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else None
        if not closed or (rest and port is None):
            raise FieldError("allowed_upstreams", f"--allowed-upstream: expected [IPV6]:PORT, got {entry!r}")
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    else:
        host, port = entry, None
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise FieldError("allowed_upstreams", f"--allowed-upstream: the port of {entry!r} must be 1-65535")
    return host, int(port) if port is not None else None


def _network(host: str) -> Network | None:
    try:
        return ip_network(host, strict=False)
    except ValueError:
        return None


def _address(host: str) -> IPv4Address | IPv6Address | None:
    """The host as an IP address (an IPv4 address mapped into IPv6 as itself), or None for a name."""
    try:
        address = ip_address(host)
    except ValueError:
        return None
    mapped = address.ipv4_mapped if isinstance(address, IPv6Address) else None
    return mapped or address
