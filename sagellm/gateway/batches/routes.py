"""OpenAI's Files API (`/v1/files`: upload, list, retrieve, content, delete) and Batch API (`/v1/batches`: create,
retrieve, list, cancel), as the openai SDK calls them. A file or batch belongs to the API key that made it (a digest
is kept, never the key): another key's is a 404."""

from __future__ import annotations

import msgspec

from sagellm.gateway.batches.batch_store import BatchRecord
from sagellm.gateway.batches.files import PURPOSES
from sagellm.gateway.batches.multipart import form_fields
from sagellm.gateway.batches.runner import ENDPOINTS, BatchRunner
from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.http.metadata import Metadata
from sagellm.gateway.http.paging import page


class CreateBatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: Metadata | None = None


class BatchRoutes:
    def __init__(self, runner: BatchRunner) -> None:
        self.runner, self.files, self.batches = runner, runner.files, runner.store

    def register(self, app: App, guard: Guard | None) -> None:
        app.route("POST", "/v1/files", self.upload, guard)
        app.route("GET", "/v1/files", self.list_files, guard)
        app.route("GET", "/v1/files/{file_id}", self.show_file, guard)
        app.route("GET", "/v1/files/{file_id}/content", self.file_content, guard)
        app.route("DELETE", "/v1/files/{file_id}", self.delete_file, guard)
        app.route("POST", "/v1/batches", self.create, guard)
        app.route("GET", "/v1/batches", self.list_batches, guard)
        app.route("GET", "/v1/batches/{batch_id}", self.show, guard)
        app.route("POST", "/v1/batches/{batch_id}/cancel", self.cancel, guard)

    # -- files ----------------------------------------------------------------------------------------------------
    async def upload(self, http: HttpRequest) -> Response:
        fields = form_fields(http.headers.get("content-type", ""), http.body)
        file, purpose = fields.get("file"), fields.get("purpose")
        if file is None or file.filename is None:
            raise ApiError(400, "file: the upload has no file field", param="file")
        wanted = purpose.data.decode(errors="replace") if purpose is not None else ""
        if wanted not in PURPOSES:
            raise ApiError(400, f"purpose: one of {', '.join(PURPOSES)}, got {wanted!r}", param="purpose")
        return Response(self.files.add(key_owner(http), file.filename, wanted, file.data).public())

    async def list_files(self, http: HttpRequest) -> Response:
        purpose = http.query.get("purpose")
        owned = [r for r in self.files.owned_by(key_owner(http)) if purpose is None or r.purpose == purpose]
        return Response({"object": "list", "data": [r.public() for r in reversed(owned)], "has_more": False})

    async def show_file(self, http: HttpRequest) -> Response:
        return Response(self.files.get(http.path_params["file_id"], key_owner(http)).public())

    async def file_content(self, http: HttpRequest) -> Response:
        data = self.files.content(http.path_params["file_id"], key_owner(http))
        return Response(data, content_type="application/octet-stream")

    async def delete_file(self, http: HttpRequest) -> Response:
        file_id = http.path_params["file_id"]
        self.files.delete(file_id, key_owner(http))
        return Response({"id": file_id, "object": "file", "deleted": True})

    # -- batches --------------------------------------------------------------------------------------------------
    async def create(self, http: HttpRequest) -> Response:
        body = http.json(CreateBatch)
        owner = key_owner(http)
        if body.endpoint not in ENDPOINTS:
            raise ApiError(400, f"endpoint: one of {', '.join(ENDPOINTS)}, got {body.endpoint!r}", param="endpoint")
        if body.completion_window != "24h":
            raise ApiError(400, f"completion_window: 24h, got {body.completion_window!r}", param="completion_window")
        file = self.files.get(body.input_file_id, owner)
        if file.purpose != "batch":
            raise ApiError(400, f"input_file_id: {file.id} was uploaded for {file.purpose!r}, not 'batch'",
                           param="input_file_id")  # fmt: skip
        return Response(self.runner.create(owner, file.id, body.endpoint, body.metadata).public())

    async def list_batches(self, http: HttpRequest) -> Response:
        owned = sorted((r for r in self.batches.records.values() if r.owner == key_owner(http)),
                       key=lambda r: (-r.created_at, r.id))  # fmt: skip
        return Response(page([r.public() for r in owned], http.query))

    async def show(self, http: HttpRequest) -> Response:
        return Response(self._batch(http).public())

    async def cancel(self, http: HttpRequest) -> Response:
        record = self._batch(http)
        if record.status not in ("validating", "in_progress", "cancelling"):
            raise ApiError(409, f"batch {record.id} is {record.status}; only one that runs can be cancelled",
                           code="conflict")  # fmt: skip
        self.runner.cancel(record)
        return Response(record.public())

    def _batch(self, http: HttpRequest) -> BatchRecord:
        batch_id = http.path_params["batch_id"]
        record = self.batches.records.get(batch_id)
        if record is None or record.owner != key_owner(http):
            raise ApiError(404, f"no batch {batch_id!r}", code="not_found", param="batch_id")
        return record
