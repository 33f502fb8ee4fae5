"""A request's media reference to decoded media, the room's one door: where it points is checked (`source`), its
bytes read under the policy's caps (`fetch`), then decoded in a worker thread (`image`, `audio`), since PIL on a large
image holds a core for a while and the event loop has other requests to serve. `param` names the request's part
(`messages[0].content[1].image_url`) in every refusal."""

from __future__ import annotations

import trio
from PIL import Image

from sagellm.gateway.media.audio import MP3_REFUSED, decode_audio, decode_wav
from sagellm.gateway.media.fetch import base64_bytes, read_bytes
from sagellm.gateway.media.image import decode_image
from sagellm.gateway.media.policy import MediaPolicy
from sagellm.gateway.media.refusal import refused
from sagellm.gateway.media.source import locate


async def load_image(url: str, policy: MediaPolicy, param: str) -> Image.Image:
    """An `image_url` part's image, in its own mode (the processor converts it)."""
    data = await read_bytes(locate(url, "image", policy, param), policy, param)
    return await trio.to_thread.run_sync(decode_image, data, policy.max_pixels, param)


async def image_bytes(url: str, policy: MediaPolicy, param: str) -> bytes:
    """An `image_url` part's file as it came, checked to decode as an image under the caps: what a request carries
    to the engine, which decodes it again (a few kilobytes over the wire, not its pixels)."""
    data = await read_bytes(locate(url, "image", policy, param), policy, param)
    await trio.to_thread.run_sync(decode_image, data, policy.max_pixels, param)
    return data


async def audio_bytes(part: dict[str, str], policy: MediaPolicy, param: str) -> bytes:
    """An audio part's WAV file, checked to decode under the caps: what a request carries to the engine (which
    decodes it again). `part`: input_audio's {data, format} or audio_url's {url}; `param` names the part."""
    if "url" in part:
        data = await read_bytes(locate(part["url"], "audio", policy, param), policy, param)
        await trio.to_thread.run_sync(decode_audio, data, param)
        return data
    _check_format(part["format"], param)

    def decoded_and_checked() -> bytes:
        data = base64_bytes(part["data"], policy.max_bytes, f"{param}.data")
        decode_wav(data, f"{param}.data")
        return data

    return await trio.to_thread.run_sync(decoded_and_checked)


def _check_format(audio_format: str, param: str) -> None:
    if audio_format == "mp3":
        raise refused(f"{param}.format", MP3_REFUSED)
    if audio_format != "wav":
        raise refused(f"{param}.format", f"must be 'wav' or 'mp3', got {audio_format!r}")
