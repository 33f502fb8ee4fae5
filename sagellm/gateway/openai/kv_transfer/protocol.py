"""vLLM's disaggregated-serving request protocol, served: two `sagellm serve` processes do PD for a proxy that
speaks it (vLLM's disaggregation proxy, vllm-router's PD mode, sageLLM's own gateway with servers attached as prefill
and decode).

- The prefill call carries `kv_transfer_params: {"do_remote_decode": true, ...}` (not streamed; the proxy asks one
  token). This server prefills the prompt, keeps its KV (`KVOutbox`), and answers the first token with
  `kv_transfer_params: {"do_remote_prefill": true, "remote_host", "remote_port", "remote_request_id", ...}`: where
  the KV waits (the address the proxy reached this server at) and the secret it waits under.
- The decode call carries those params back. This server fetches the KV from the prefill server
  (`GET /v1/kv_transfer/{remote_request_id}`, one msgpack body) and continues from it (the engine checks it is
  this prompt's: the same tokens): the first token is the prefill's, the rest is decoded here.
A KV fetched is gone, so a decode that fails is retried from the prefill, as vLLM's proxies do.

Either half is served only in the role the operator started this server in, and a decode fetches only from the
prefill servers it listed (`peers`): the KV fetched goes into the engine's prefix cache, shared by every user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from sagellm.gateway.http.app import HttpRequest
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.kv_transfer.peers import PARAM, KVPeer, KVPeers
from sagellm.gateway.serving.kv_outbox import KVOutbox, KVPayload
from sagellm.runtime.pipeline.messages import Prefilled

FETCH_TIMEOUT_S = 60.0  # the whole KV (tens of MB on a long prompt)
CONNECT_TIMEOUT_S = 5.0
MAX_SECRET = 128  # characters of a remote_request_id (ours: 32)


@dataclass(frozen=True)
class RemotePrefill:
    """Where a decode request's KV waits: a prefill server the operator listed, and the secret."""

    peer: KVPeer
    secret: str


def handoff(
    params: dict[str, Any] | None, peers: KVPeers, *, stream: bool, choices: int, prompts: int
) -> str | RemotePrefill | None:
    """What a body's `kv_transfer_params` asks: "export" (prefill here for a decode server), a `RemotePrefill`
    (decode here from a listed one), or None (neither: vLLM's default params). A 400 naming the field for anything
    else, and for what this server's role (`peers`) does not do."""
    asked = _asked(params or {}, peers)
    if asked is not None and (choices != 1 or prompts != 1):
        raise ApiError(400, f"{PARAM}: one prompt, one choice (n=1) per disaggregated request", param=PARAM)
    if asked == "export" and stream:
        raise ApiError(400, f"{PARAM}: a remote decode's prefill answers whole: stream=false", param=PARAM)
    return asked


def _asked(params: dict[str, Any], peers: KVPeers) -> str | RemotePrefill | None:
    if params.get("do_remote_decode"):
        peers.allow("do_remote_decode")
        return "export"
    if not params.get("do_remote_prefill"):
        return None
    peers.allow("do_remote_prefill")
    host, port, secret = params.get("remote_host"), params.get("remote_port"), params.get("remote_request_id")
    valid_port = isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536
    valid_secret = isinstance(secret, str) and len(secret) <= MAX_SECRET and _url_safe(secret)
    if not (isinstance(host, str) and host and valid_port and valid_secret):
        message = f"{PARAM}: do_remote_prefill needs remote_host, remote_port and remote_request_id"
        raise ApiError(400, message, param=PARAM)
    return RemotePrefill(peers.source(host, port), secret)


def _url_safe(secret: str) -> bool:
    return secret.isascii() and secret.replace("-", "").replace("_", "").isalnum()


def reply_params(outbox: KVOutbox, request_id: str, http: HttpRequest, engine_id: str) -> dict[str, Any] | None:
    """The prefill reply's `kv_transfer_params` (None when the request made no KV: it failed first)."""
    secret = outbox.claim(request_id)
    if secret is None:
        return None
    host, _, port = http.headers.get("host", "").rpartition(":")
    return {
        "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": engine_id,
        "remote_block_ids": None, "remote_host": host.strip("[]") or "127.0.0.1", "remote_port": int(port or 80),
        "remote_request_id": secret, "tp_size": 1,
    }  # fmt: skip


async def fetch(remote: RemotePrefill, client: httpx.AsyncClient) -> Prefilled:
    """The KV a listed prefill server keeps for this request; a 503 (retry from the prefill) when it cannot be had."""
    url = remote.peer.url(remote.secret)
    try:
        reply = await client.get(url, timeout=httpx.Timeout(FETCH_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
    except httpx.HTTPError as error:
        raise ApiError(503, f"{PARAM}: the prefill server at {remote.peer.host}:{remote.peer.port}: {error}") from None
    if reply.status_code != 200:
        message = f"{PARAM}: the prefill server has no KV under that id (fetched, expired or never made)"
        raise ApiError(503, message, code="unavailable")
    try:
        return msgspec.msgpack.decode(reply.content, type=KVPayload).prefilled()
    except (msgspec.DecodeError, ValueError) as error:
        raise ApiError(503, f"{PARAM}: the prefill server sent no KV: {error}", code="unavailable") from None
