"""Where a media reference points, checked against the operator's policy before anything is read: a `data:` URL, an
allowed `http(s)://` host, or a file inside the allowed local directory. Anything else is refused here, so the
fetcher only ever sees a place it may go."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit
from urllib.request import url2pathname

import httpx

from sagellm.gateway.media.policy import MediaPolicy
from sagellm.gateway.media.refusal import refused

_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*):")  # RFC 3986's; a local path has none
SCHEMES = "data:, http://, https://, file:// or an absolute local path"


@dataclass(frozen=True)
class DataSource:
    """A `data:<mime>;base64,<payload>` URL: the medium is in the request."""

    mime: str  # lower-case, without parameters
    payload: str  # base64 text


@dataclass(frozen=True)
class RemoteSource:
    url: httpx.URL  # an allowed host's


@dataclass(frozen=True)
class LocalSource:
    path: str  # as the request wrote it; `allowed_local` checks it where the file is read (off the event loop)


MediaSource = DataSource | RemoteSource | LocalSource


def locate(reference: str, kind: str, policy: MediaPolicy, param: str) -> MediaSource:
    """The source `reference` names, for a medium of `kind` ("image" or "audio"): a data URL's type must be of that
    kind. Refuses a scheme this room does not read or a host the policy does not allow; a local path is checked
    where it is read (`allowed_local`), as that touches the file system."""
    if not reference:
        raise refused(param, f"the URL is empty; send {SCHEMES}")
    found = _SCHEME.match(reference)
    scheme = found.group(1).lower() if found else ""
    if scheme == "data":
        return _data_source(reference, kind, param)
    if scheme in ("http", "https"):
        try:
            url = httpx.URL(reference)
        except httpx.InvalidURL as error:
            raise refused(param, f"not a valid URL ({error})") from None
        return RemoteSource(allowed_remote(url, policy, param))
    if scheme == "file":
        return LocalSource(_file_url_path(reference, param))
    if scheme == "":
        return LocalSource(reference)
    raise refused(param, f"{scheme}: URLs are not read; send {SCHEMES}")


def allowed_remote(url: httpx.URL, policy: MediaPolicy, param: str) -> httpx.URL:
    """`url` when the policy allows fetching it (a request's URL, and each redirect's target)."""
    if url.scheme not in ("http", "https"):
        raise refused(param, f"{url.scheme}: URLs are not fetched; send {SCHEMES}")
    if url.userinfo:
        raise refused(param, "URLs with a user name or password are not fetched")
    if not policy.allows_host(url.host):
        raise refused(param, f"fetching media from {url.host!r} is not allowed (the server's --allowed-media-domains)")
    return url


def allowed_local(path: str, policy: MediaPolicy, param: str) -> str:
    """The real path of `path` (symlinks and `..` resolved) when it lies inside the allowed local directory. Blocks
    on the file system: called off the event loop."""
    root = policy.allowed_local_path
    if root is None:
        raise refused(param, "local media files are not read (the server's --allowed-local-media-path is unset)")
    if not os.path.isabs(path):
        raise refused(param, f"a local media path must be absolute, got {path!r}")
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != root:
        raise refused(param, f"{path!r} is outside the allowed local media directory")
    return real


def _data_source(reference: str, kind: str, param: str) -> DataSource:
    header, comma, payload = reference[len("data:") :].partition(",")
    if not comma:
        raise refused(param, f"a data URL is data:{kind}/<type>;base64,<data>; this one has no comma")
    mime, *options = (part.strip().lower() for part in header.split(";"))
    if not options or options[-1] != "base64":
        raise refused(param, f"only base64 data URLs are read (data:{kind}/<type>;base64,<data>)")
    if not mime.startswith(f"{kind}/"):
        raise refused(param, f"a data URL here must have an {kind}/* type, got {mime or 'none'!r}")
    return DataSource(mime, payload)


def _file_url_path(reference: str, param: str) -> str:
    parts = urlsplit(reference)
    if parts.netloc not in ("", "localhost"):
        raise refused(param, f"file:// URLs name a file on this server, not on {parts.netloc!r}")
    return url2pathname(parts.path)
