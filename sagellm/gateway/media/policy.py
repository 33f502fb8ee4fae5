"""Where a request's media may be loaded from, and how much of it: the operator's word (vLLM's
`--allowed-media-domains` and `--allowed-local-media-path`, its fetch timeouts and audio size cap), never a request's.

A URL in a request makes the gateway fetch it, so with no list any user could point the gateway at an internal
service or a cloud's metadata address (server-side request forgery): no host is allowed by default, where vLLM
fetches from anywhere unless given a list. Hosts are compared exactly as written (lower-case, without a trailing dot)
and never resolved, so no DNS answer widens the list; the port is not part of the match (as vLLM's). Redirects are
not followed by default, where vLLM follows them: a redirect could leave the allowed hosts."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sagellm.common.errors import FieldError

MAX_BYTES = 25 * 1024 * 1024  # vLLM's VLLM_MAX_AUDIO_CLIP_FILESIZE_MB (25), for every kind of media here
TIMEOUT_S = 10.0  # vLLM's VLLM_AUDIO_FETCH_TIMEOUT (its images' is 5 s): one fetch, connect to last byte
MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS, the decompression-bomb limit vLLM keeps


@dataclass(frozen=True)
class MediaPolicy:
    """`allowed_domains`: hosts `http(s)://` media may come from (none: no remote media); `allowed_local_path`: the
    directory `file://` URLs and local paths must resolve inside (None: no local media); `max_bytes`: the most one
    medium may be, encoded; `timeout_s`: the most one fetch may take; `max_pixels`: an image's width x height cap;
    `allow_redirects`: follow a fetch's redirects (each to an allowed host, at most MAX_REDIRECTS)."""

    allowed_domains: frozenset[str] = frozenset()
    allowed_local_path: str | None = None
    max_bytes: int = MAX_BYTES
    timeout_s: float = TIMEOUT_S
    max_pixels: int = MAX_PIXELS
    allow_redirects: bool = False

    def __post_init__(self) -> None:
        """Hosts as `allows_host` compares them; the local directory as its real path (symlinks resolved), so that
        a file's real path is compared with it. A FieldError names the setting a bad value came from."""
        domains = frozenset(host.strip().lower().rstrip(".") for host in self.allowed_domains)
        for host in domains:
            if not host or any(c in host for c in "/:@ "):
                raise FieldError("allowed_media_domains", f"--allowed-media-domains takes host names, got {host!r}")
        object.__setattr__(self, "allowed_domains", domains)
        if self.allowed_local_path is not None:
            root = os.path.realpath(self.allowed_local_path)
            if not os.path.isdir(root):
                why = f"--allowed-local-media-path must be a directory, got {self.allowed_local_path!r}"
                raise FieldError("allowed_local_media_path", why)
            object.__setattr__(self, "allowed_local_path", root)
        for name in ("max_bytes", "timeout_s", "max_pixels"):
            if getattr(self, name) <= 0:
                raise FieldError(name, f"{name} must be positive, got {getattr(self, name)}")

    def allows_host(self, host: str) -> bool:
        """Whether media may be fetched from `host` (a URL's host, as httpx gives it)."""
        return host.lower().rstrip(".") in self.allowed_domains


def media_policy(allowed_domains: list[str], allowed_local_path: str | None) -> MediaPolicy:
    """The policy of a gateway's settings (`--allowed-media-domains`, each may list several hosts by commas, and
    `--allowed-local-media-path`), with the default caps."""
    hosts = frozenset(h.strip() for given in allowed_domains for h in given.split(",") if h.strip())
    return MediaPolicy(allowed_domains=hosts, allowed_local_path=allowed_local_path)
