"""Whom this server trades KV with in disaggregated serving across servers (vLLM's `kv_transfer_params`): its
operator says so at start (`sagellm serve --kv-transfer-role ROLE --kv-transfer-peers HOST:PORT,...`), never a
request.

A decode call's `remote_host` and `remote_port` say where this server fetches the prompt's KV from, and what it
fetches goes into its engine's prefix cache, which every user's prompts share. Were any host a caller names fetched
from, a caller would make this server connect wherever it reaches (telling open ports from closed ones by the error),
and answer other users' prompts from a KV of its own making. So, as vLLM reads the field only when its operator
started it with a KV connector (`--kv-transfer-config`, whose `kv_role` is kv_producer, kv_consumer or kv_both), this
server reads it only in the role it was started in, and fetches only from the prefill servers listed, checked before
any connection: a host is a DNS name or an IP literal (nothing a URL reads past its host: no path, `user@`, query or
port), matched case aside against the names listed or against the addresses a listed name resolved to at start. A
name a caller sends is never resolved: its answer could change between the check and the fetch."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import structlog

from sagellm.gateway.config import ASKS, KVTransferSettings, host_of, peer_address
from sagellm.gateway.http.errors import ApiError

log = structlog.get_logger("sagellm.kv_peers")
PARAM = "kv_transfer_params"


@dataclass(frozen=True)
class KVPeer:
    """A prefill server this server fetches KV from: a host and port the operator listed (`KVPeers.source` makes
    them, and nothing else does)."""

    host: str
    port: int

    def url(self, secret: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1/kv_transfer/{secret}"


class KVPeers:
    """The operator's word on `kv_transfer_params` (`settings`; None: disaggregation off, the field refused), each
    listed name's addresses resolved once, here, at start."""

    def __init__(self, settings: KVTransferSettings | None) -> None:
        self.settings = settings
        self._listed: set[tuple[str, int]] = set()
        for text in settings.peers if settings is not None else ():
            host, port = peer_address(text)
            self._listed.add((host, port))
            self._listed.update((address, port) for address in _addresses(host))

    def allow(self, asked: str) -> None:
        """A 400 naming the field unless this server was started in a role that does what `asked` asks
        (`do_remote_decode` or `do_remote_prefill`)."""
        if self.settings is None:
            message = (f"{PARAM}: {asked}: this server takes no part in disaggregated serving across servers (its "
                       "operator enables it with --kv-transfer-role); send the request without it")  # fmt: skip
            raise ApiError(400, message, param=PARAM)
        if self.settings.role not in ASKS[asked]:
            roles = " or ".join(ASKS[asked])
            message = (
                f"{PARAM}: {asked}: this server was started with --kv-transfer-role {self.settings.role}, not {roles}"
            )
            raise ApiError(400, message, param=PARAM)

    def source(self, host: str, port: int) -> KVPeer:
        """Where a decode call's KV is fetched from: its `remote_host`:`remote_port` when that is a prefill server
        listed; a 400 naming the field otherwise, before any connection is made."""
        name = host_of(host)
        if name is None:
            message = f"{PARAM}: remote_host must be a host name or an IP address alone (no path, user, query or port)"
            raise ApiError(400, message, param=PARAM)
        if (name, port) not in self._listed:
            message = (f"{PARAM}: remote_host and remote_port name no prefill server this server fetches KV from "
                       "(its --kv-transfer-peers)")  # fmt: skip
            raise ApiError(400, message, param=PARAM)
        return KVPeer(name, port)


def _addresses(host: str) -> set[str]:
    """The IP addresses a listed name resolves to now; none for an address, or for a name that does not resolve yet
    (then it is matched by name alone, and resolved when the KV is fetched)."""
    try:
        ipaddress.ip_address(host)
        return set()
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as error:
        log.warning("kv_peer_unresolved", host=host, error=str(error))
        return set()
    addresses = (host_of(str(info[4][0])) for info in found)  # (a zoned IPv6 one is none: no caller can name it)
    return {address for address in addresses if address is not None}
