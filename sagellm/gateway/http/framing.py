"""The bytes of HTTP/1.1: a request head parsed, a reply's head and body written, and `Close`, which ends a
connection (answered first with the reply it carries, for what does not parse)."""

from __future__ import annotations

import re
import time
from email.utils import formatdate
from http import HTTPStatus

from sagellm.gateway.http.app import Response, error_response
from sagellm.gateway.http.errors import ApiError


# Not a SageLLMError: the connection's own way out of a request it cannot serve, caught in `connection` and never
# seen by a caller.
class Close(Exception):
    """The connection ends here: a malformed request (answered first, when `response` is given) or a client gone."""

    def __init__(self, response: Response | None = None) -> None:
        self.response = response


TLS_HANDSHAKE = b"\x16"  # a TLS record's first byte when a client starts a handshake (its ClientHello)
BARE_LINE_END = "a line of the request head ends with a bare LF or holds a bare CR; HTTP/1.1 lines end with CRLF"
# A control character other than tab (NUL above all): RFC 9110 allows none in a field value, nor RFC 9112 in the
# request line, and a proxy or log reading past one (a C string ends at NUL) would see another request than ours.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Request line and headers (names lower-cased; repeated ones joined with ", "); raises Close with a 400 or 505
    for what does not parse."""
    lines = head.split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise Close(error_reply(400, BARE_LINE_END))
    _refuse_controls(lines)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise Close(error_reply(400, f"bad request line {lines[0][:100]!r}"))
    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise Close(error_reply(505, f"{version[:20]!r} is not served; use HTTP/1.1"))
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
            raise Close(error_reply(400, f"bad header line {line[:100]!r}"))
        key, text = name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise Close(error_reply(400, "conflicting Content-Length headers"))
            text = headers[key] if key == "content-length" else f"{headers[key]}, {text}"
        headers[key] = text
    if version == "HTTP/1.1" and "host" not in headers:
        raise Close(error_reply(400, "an HTTP/1.1 request must carry a Host header"))
    return method.upper(), target, version, headers


def _refuse_controls(lines: list[bytes]) -> None:
    """Raises Close with a 400 naming the first line of the head (the request line, or a header by its name) that
    holds a control character, and which one."""
    for number, line in enumerate(lines):
        if found := _CONTROL.search(line):
            where = f"the header {line.partition(b':')[0][:40].decode('latin-1')!r}" if number else "the request line"
            message = f"{where} holds a control character (0x{found[0][0]:02x}); RFC 9110 allows none but tab"
            raise Close(error_reply(400, message))


def check_head_start(partial: bytes | bytearray) -> None:
    """Raises Close with a 400 as soon as the start of a head, still incomplete, cannot be an HTTP/1.x request: a TLS
    handshake (its record type byte, 0x16), a first word that is not a method, or a line ended by a bare LF. Without
    it such bytes wait the whole header timeout for a `CRLF CRLF` that never comes."""
    if partial[:1] == TLS_HANDSHAKE:
        raise Close(error_reply(400, "this port speaks plain HTTP, not TLS: use an http:// URL, not https://"))
    method = partial[: partial.find(b" ")] if b" " in partial else partial
    if (method or b" " in partial) and not method.isalpha():
        raise Close(error_reply(400, f"the request does not start with an HTTP method: {bytes(partial[:20])!r}"))
    newline = partial.find(b"\n")
    while newline >= 0:
        if partial[newline - 1 : newline] != b"\r":
            raise Close(error_reply(400, BARE_LINE_END))
        newline = partial.find(b"\n", newline + 1)


def keeps_alive(version: str, connection: str) -> bool:
    tokens = {t.strip().lower() for t in connection.split(",")}
    return "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens


def error_reply(status: int, message: str, code: str | None = None) -> Response:
    default = "invalid_request" if status < 500 else "unsupported"
    return error_response(ApiError(status, message, code=code or default))


_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    """The Date header's value, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]


def head_bytes(status: int, headers: bytes, keep_alive: bool) -> bytes:
    reason = _REASONS.get(status, b"")
    connection = b"" if keep_alive else b"connection: close\r\n"
    return b"HTTP/1.1 %d %b\r\ndate: %b\r\nserver: sagellm\r\n%b%b\r\n" % (status, reason, _date(), headers, connection)


def reply_bytes(response: Response, keep_alive: bool, head_only: bool) -> bytes:
    body = response.encoded()
    headers = b"content-type: %b\r\ncontent-length: %d\r\n" % (response.content_type.encode(), len(body))
    headers += b"".join(b"%b: %b\r\n" % (name, value) for name, value in response.headers)
    return head_bytes(response.status, headers, keep_alive) + (b"" if head_only else body)
