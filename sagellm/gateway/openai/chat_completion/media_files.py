"""A chat's image and audio files, in the order its messages hold them, as its request carries them to the engine:
each part's URL or data fetched or decoded and checked under the operator's media policy, or, for a part that gives
only its `uuid`, the file its sender sent under that name before (`media.by_uuid`), which a part with data and a
uuid keeps."""

from __future__ import annotations

from typing import Any

from sagellm.gateway.media import MediaPolicy, audio_bytes, image_bytes
from sagellm.gateway.media.by_uuid import MediaByUuid
from sagellm.gateway.openai.chat_completion.protocol import MediaPart, audio_parts, image_parts


async def chat_media_files(
    chat: Any, policy: MediaPolicy, kept: MediaByUuid, owner: str
) -> tuple[list[bytes], list[bytes]]:
    """(the images' files, the clips' WAV files) of `chat`'s messages; `owner`: who sent it (its uuids are its own)."""
    images = [await _file(part, "image", policy, kept, owner) for part in image_parts(chat)]
    clips = [await _file(part, "audio", policy, kept, owner) for part in audio_parts(chat)]
    return images, clips


async def _file(part: MediaPart, modality: str, policy: MediaPolicy, kept: MediaByUuid, owner: str) -> bytes:
    if part.source is None:  # the uuid alone: the protocol let it through only with one
        return kept.recall(owner, modality, part.uuid or "", part.param)
    if modality == "image":
        data = await image_bytes(part.source, policy, part.param)
    else:
        data = await audio_bytes(part.source, policy, part.param)
    if part.uuid is not None:
        kept.remember(owner, modality, part.uuid, data)
    return data
