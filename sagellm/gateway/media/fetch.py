"""A checked source's bytes, capped: a data URL's payload decoded, an allowed host's body fetched with httpx on trio
(the client the gateway's control plane uses), an allowed local file read. The blocking parts (base64 over megabytes,
the file system) run in a worker thread so the event loop keeps serving other requests.

A fetch's cap is on its whole life, connect to last byte (`MediaPolicy.timeout_s`), not httpx's per-read timeouts,
which a server trickling a byte at a time never trips. Bytes are counted as they arrive as well as checked against a
declared Content-Length, and the body is asked for without compression (`accept-encoding: identity`) and read raw,
so what is counted is what is kept and a small compressed body cannot inflate past the cap."""

from __future__ import annotations

import base64
import binascii
import os
import ssl
import stat
from functools import cache

import httpx
import trio

from sagellm.gateway.media.policy import MediaPolicy
from sagellm.gateway.media.refusal import refused
from sagellm.gateway.media.source import DataSource, LocalSource, MediaSource, allowed_local, allowed_remote

MAX_REDIRECTS = 5  # hops followed when the operator allows redirects, each to an allowed host


async def read_bytes(source: MediaSource, policy: MediaPolicy, param: str) -> bytes:
    """The medium's encoded bytes (at most `policy.max_bytes`); a 400 naming `param` for anything that goes wrong."""
    if isinstance(source, DataSource):
        return await trio.to_thread.run_sync(base64_bytes, source.payload, policy.max_bytes, param)
    if isinstance(source, LocalSource):
        return await trio.to_thread.run_sync(_read_local, source.path, policy, param)
    return await _fetch(source.url, policy, param)


def base64_bytes(payload: str, max_bytes: int, param: str) -> bytes:
    """`payload` decoded (strict base64: no stray characters), refused before decoding when it would be too big."""
    size = len(payload) // 4 * 3  # what it decodes to, give or take its padding
    if size > max_bytes:
        raise refused(param, f"the data is about {size} bytes, over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise refused(param, f"the data is not valid base64 ({error})") from None


def _read_local(path: str, policy: MediaPolicy, param: str) -> bytes:
    real = allowed_local(path, policy, param)
    try:
        # O_NOFOLLOW: a symlink put in place of the checked file since is not followed out of the directory;
        # O_NONBLOCK: a FIFO opens at once (and is refused below) rather than holding the thread for a writer.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise refused(param, f"cannot read {path!r} ({error.strerror})") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise refused(param, f"{path!r} is not a regular file")
        if info.st_size > policy.max_bytes:
            raise refused(param, f"{path!r} is {info.st_size} bytes, over the limit of {policy.max_bytes} bytes")
        data = file.read(policy.max_bytes + 1)  # a file that grew since fstat is still capped
    if len(data) > policy.max_bytes:
        raise refused(param, f"{path!r} is over the limit of {policy.max_bytes} bytes")
    return data


async def _fetch(url: httpx.URL, policy: MediaPolicy, param: str) -> bytes:
    with trio.move_on_after(policy.timeout_s):
        try:
            # timeout=None: the whole fetch's cap above is the only one; trust_env as the gateway's other clients.
            async with httpx.AsyncClient(verify=_tls(), timeout=None, follow_redirects=False) as client:
                return await _follow(client, url, policy, param)
        except (httpx.HTTPError, httpx.InvalidURL) as error:  # InvalidURL: a redirect's Location
            raise refused(param, f"fetching {url} failed ({type(error).__name__}: {error})") from None
    raise refused(param, f"fetching {url} took over {policy.timeout_s:g} s")


@cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every fetch: building one loads the CA bundle, ~20 ms on the event loop each time."""
    return httpx.create_ssl_context()


async def _follow(client: httpx.AsyncClient, url: httpx.URL, policy: MediaPolicy, param: str) -> bytes:
    """The body at `url`, following redirects only as the policy allows, each target checked as the first URL was."""
    for _ in range(MAX_REDIRECTS + 1):
        async with client.stream("GET", url, headers={"accept-encoding": "identity"}) as response:
            if response.is_redirect:
                target = url.join(response.headers["location"])
                if not policy.allow_redirects:
                    raise refused(param, f"{url} redirects to {target}; redirects are not followed, send the target")
                url = allowed_remote(target, policy, param)
                continue
            if not response.is_success:
                raise refused(param, f"fetching {url} answered HTTP {response.status_code}")
            return await _capped_body(response, url, policy.max_bytes, param)
    raise refused(param, f"fetching {url} took more than {MAX_REDIRECTS} redirects")


async def _capped_body(response: httpx.Response, url: httpx.URL, max_bytes: int, param: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise refused(param, f"{url} is {declared} bytes, over the limit of {max_bytes} bytes")
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > max_bytes:
            raise refused(param, f"{url} sent over {max_bytes} bytes, the limit")
    return bytes(body)
