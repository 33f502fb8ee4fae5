"""A completion's or a chat's part in disaggregated serving across servers (`kv_transfer_params`, vLLM's protocol:
`protocol`): marked to prefill for a decode server, or given the KV a prefill server made for it, and the prefill's
reply field that says where its KV waits. One per server, shared by both endpoints: the prefill servers this one
may fetch from were resolved once at start (`peers`), and one HTTP client fetches from them."""

from __future__ import annotations

import httpx

from sagellm.gateway.config import KVTransferSettings
from sagellm.gateway.http.app import HttpRequest
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.generation.protocol import GenerationRequest
from sagellm.gateway.openai.kv_transfer import protocol
from sagellm.gateway.openai.kv_transfer.peers import KVPeers
from sagellm.gateway.openai.kv_transfer.protocol import RemotePrefill
from sagellm.gateway.serving.kv_outbox import KVOutbox
from sagellm.runtime.pipeline.messages import Request


class KVHandOff:
    def __init__(
        self, settings: KVTransferSettings | None = None, outbox: KVOutbox | None = None, boot_id: str = ""
    ) -> None:
        """`settings`: this server's part in disaggregated serving across servers (None: none, `kv_transfer_params`
        refused; an API server's, whose core keeps no KV for other servers); `outbox`: where the KV of its prefills
        waits for decode servers, in the run `boot_id` names (the gateway core's `kv_outbox` and `boot_id`)."""
        self.outbox, self.boot_id = outbox, boot_id
        self._http: httpx.AsyncClient | None = None  # fetches prefills' KV from other servers, once one is asked
        self.peers = KVPeers(settings)  # its listed prefill servers' names resolved now, once

    async def take(self, body: GenerationRequest, requests: list[Request], choices: int) -> None:
        """A request's part in disaggregated serving across servers: marked to prefill for a decode server
        ("export"), or given the KV a prefill server made for it: the one place a KV made elsewhere enters this
        server's engine, and its prefix cache shared by every user, so only one fetched from a prefill server the
        operator listed (`peers`; the engine checks it is this prompt's tokens)."""
        params, count = body.kv_transfer_params, len(requests)
        asked = protocol.handoff(params, self.peers, stream=body.stream, choices=choices, prompts=count)
        if body.prompt_logprobs is not None and asked is not None:
            raise ApiError.unsupported("prompt_logprobs", "not scored in a request split across servers")
        if asked == "export":
            requests[0].kv_export = True
        elif isinstance(asked, RemotePrefill):
            requests[0].prefilled = await protocol.fetch(asked, self._client())

    def reply(self, request: Request, http: HttpRequest | None) -> dict:
        """A prefill's reply field: where its KV waits for the decode server."""
        if not request.kv_export or http is None:
            return {}
        assert self.outbox is not None  # (a request exports its KV only where `settings` let it: the gateway's)
        params = protocol.reply_params(self.outbox, request.request_id, http, self.boot_id)
        return {"kv_transfer_params": params}

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient()
        return self._http
