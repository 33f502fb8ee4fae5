"""`GET /v1/requests/{request_id}`: sageLLM's own route to a request's status by the `id` of its reply (the serving
core keeps it for requests in flight and the latest that ended), read only by the API key that sent it."""

from __future__ import annotations

from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.core import ServingCore


class RequestStatusRoutes:
    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def register(self, app: App, guard: Guard | None) -> None:
        app.route("GET", "/v1/requests/{request_id}", self.request_status, guard)

    async def request_status(self, http: HttpRequest) -> Response:
        """Where a request is (queued, running, completed, failed, cancelled), by the `id` of its reply; only the API
        key that sent it reads it (another key gets the 404 of an unknown id)."""
        request_id = http.path_params["request_id"]
        status = self.core.request_status(request_id, key_owner(http))
        if status is None:
            raise ApiError(404, f"no request {request_id!r} here (or it ended long ago)", code="not_found")
        return Response(status)
