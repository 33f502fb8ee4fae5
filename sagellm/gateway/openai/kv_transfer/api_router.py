"""The prefill side's one route in disaggregated serving across servers (`protocol`): a decode server fetches the KV
a prefill left for it, under the secret id the prefill's reply named."""

from __future__ import annotations

import structlog

from sagellm.gateway.http.app import App, HttpRequest, Response
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.kv_outbox import KVOutbox

log = structlog.get_logger("sagellm.kv_transfer")


class KVTransferRoutes:
    """`GET /v1/kv_transfer/{id}`: a decode server fetches a prefill's KV; the id (a secret) is the capability, so
    the route takes no API key (a decode server holds none of this server's)."""

    def __init__(self, outbox: KVOutbox) -> None:
        self.outbox = outbox

    def register(self, app: App) -> None:
        app.route("GET", "/v1/kv_transfer/{secret}", self.take)

    async def take(self, http: HttpRequest) -> Response:
        payload = self.outbox.take(http.path_params["secret"])
        if payload is None:
            raise ApiError(404, "no KV under that id: fetched already, expired, or never made", code="not_found")
        log.info("kv_fetched", bytes=len(payload))
        return Response(payload, content_type="application/msgpack")
