"""The form fields of a `multipart/form-data` body (the openai SDK's `files.create` uploads one), parsed by the
standard library's MIME parser: each field's name, its file name if it is a file, and its bytes."""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass

from sagellm.gateway.http.errors import ApiError


@dataclass(frozen=True)
class FormField:
    name: str
    data: bytes
    filename: str | None = None


def form_fields(content_type: str, body: bytes) -> dict[str, FormField]:
    """The fields of a multipart body by name; a 400 for any other content type or a body that is not one."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type.lower():
        raise ApiError(400, "upload the file as multipart/form-data (fields `file` and `purpose`)", param="file")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(400, "the multipart body has no parts", param="file")
    fields: dict[str, FormField] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        data = part.get_payload(decode=True) or b""
        fields[name] = FormField(name, data, part.get_filename())
    return fields
