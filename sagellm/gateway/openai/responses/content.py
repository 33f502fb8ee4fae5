"""A Responses API message's content as a chat message's: a string, its text parts (`input_text`, `output_text`,
`text`) joined, or, with `input_image` or `input_audio` parts, its text and media parts in order as the chat's
(`image_url` parts, which the chat's preparation fetches under the operator's policy, and `input_audio` parts, the
chat's own shape: base64 data and its format). An image's `image_url` is a data: or http(s) URL;
`detail` is taken and ignored, as vLLM takes it (the model's processor sets the resolution); a `file_id` is refused,
as this server stores no files. Each refusal names the item's part (`input[0].content[1].image_url`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.chat_completion.protocol import image_part
from sagellm.runtime.engine.request_limits import MAX_CONTENT_PARTS

TEXT_PARTS = ("input_text", "output_text", "text")
IMAGE_DETAILS = (None, "auto", "low", "high", "original")  # OpenAI's, each taken and ignored as vLLM does


def input_images(value: str | list[dict[str, Any]]) -> list[str]:
    """The name of each `input_image` part's URL in `input`, in the order the chat holds their parts."""
    return _named(value, _is_image, "image_url")


def input_audios(value: str | list[dict[str, Any]]) -> list[str]:
    """The name of each `input_audio` part's audio in `input`, in the order the chat holds their parts."""
    return _named(value, _is_audio, "input_audio")


def _named(value: str | list[dict[str, Any]], kind: Callable[[Any], bool], field: str) -> list[str]:
    if isinstance(value, str):
        return []
    return [
        f"input[{i}].content[{j}].{field}"
        for i, item in enumerate(value)
        if item.get("type", "message") == "message" and isinstance(item.get("content"), list)
        for j, part in enumerate(item["content"])
        if kind(part)
    ]


def message_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content: its text (`text_content`); with `input_image` or `input_audio` parts, its text and media
    parts in order, as a chat's."""
    if not isinstance(content, list) or not any(_is_image(part) or _is_audio(part) for part in content):
        return text_content(content, where)
    _check_count(content, where)
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if _is_image(part):
            parts.append(image_part(_image_url(part, at)))
        elif _is_audio(part):  # the chat's own part: checked there, a refusal renamed to this one
            parts.append({"type": "input_audio", "input_audio": part.get("input_audio")})
        elif part.get("type") in TEXT_PARTS and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise ApiError.unsupported(at, "text, input_image and input_audio parts only")
    return parts


def text_content(content: Any, where: str) -> str:
    """A message's content (or a function call's output): a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        _check_count(content, where)
        if all(isinstance(p, dict) and p.get("type") in TEXT_PARTS and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    raise ApiError.unsupported(f"{where}.content", "text or text parts only")


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "input_image"


def _is_audio(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "input_audio"


def _image_url(part: dict[str, Any], at: str) -> str:
    if part.get("file_id") is not None:
        raise ApiError.unsupported(f"{at}.file_id", "files are not stored here; send image_url (a data: or http URL)")
    if part.get("detail") not in IMAGE_DETAILS:
        message = f"{at}.detail: auto, low, high or original, got {part.get('detail')!r}"
        raise ApiError(400, message, param=f"{at}.detail")
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        message = f"{at}.image_url: a data: URL, or an http(s) URL of an allowed host, is required"
        raise ApiError(400, message, param=f"{at}.image_url")
    return url


def _check_count(content: list[Any], where: str) -> None:
    if len(content) > MAX_CONTENT_PARTS:
        message = f"{where}.content: at most {MAX_CONTENT_PARTS} parts, got {len(content)}"
        raise ApiError(400, message, param=f"{where}.content", code="invalid_request")
