"""A chat's tokens with its images and audio counted as served: each part's placeholder expanded into the tokens its
engine gives it (LLaVA's fixed run, Idefics3's tiles, Gemma 3's blank lines joined to the prompt's newlines, a clip's
frames), so `/tokenize`'s `count` and the Messages API's `count_tokens` equal the `prompt_tokens` the request would
be charged, as vLLM's `/tokenize` counts them. The media are fetched and checked under the server's media policy as
a chat's are, and refused the same way, naming the part."""

from __future__ import annotations

from typing import Any

import trio

from sagellm.common.errors import InvalidInput
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.media import MediaPolicy
from sagellm.gateway.media.by_uuid import MediaByUuid
from sagellm.gateway.openai.chat_completion.media_files import chat_media_files
from sagellm.gateway.openai.chat_completion.protocol import audio_parts, image_parts
from sagellm.runtime.pipeline.served_model import ServedModel


async def with_media_expanded(
    ids: list[int], chat: Any, served: ServedModel, name: str, policy: MediaPolicy, kept: MediaByUuid, owner: str
) -> list[int]:
    """`ids` (the chat rendered and encoded, one placeholder per part) with each image and clip of `chat`'s messages
    expanded as `served`'s engines expand them (`name`: the model as the request named it, for refusals; `kept` and
    `owner`: the files its sender named by uuid); `ids` as they are for a chat without media."""
    images, clips = image_parts(chat), audio_parts(chat)
    if not images and not clips:
        return ids
    try:
        prompts = served.prompt_media
    except InvalidInput as error:
        first = (images or clips)[0].param
        raise ApiError(400, f"{first}: {error}", param=first) from None
    for parts, modality, noun in ((images, "image", "images"), (clips, "audio", "audio")):
        if parts and (prompts is None or modality not in prompts.modalities):
            param = parts[0].param
            raise ApiError(400, f"{param}: model {name!r} takes no {noun} (it has no encoder for them here)",
                           param=param)  # fmt: skip
    image_files, clip_files = await chat_media_files(chat, policy, kept, owner)

    def expanded() -> list[int]:
        from sagellm.runtime.multimodal.prompt_media import decoded_media

        return prompts.expand(ids, decoded_media(image_files, clip_files))[0]

    try:  # decoding and resizing hold a core a while: off the event loop, as a chat's images are
        return await trio.to_thread.run_sync(expanded)
    except InvalidInput as error:  # placeholders and media that do not pair up, too many, ...
        raise ApiError(400, f"messages: {error}", param="messages") from None
