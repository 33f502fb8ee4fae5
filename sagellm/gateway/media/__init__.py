"""Media in requests (images and audio in content parts), loaded as vLLM's media connector does, and safely: what a
reference may point at is the operator's `MediaPolicy` (allowed hosts, an allowed local directory, byte, time and
pixel caps), and every refusal is a 400 naming the request's part.

Layering, bottom to top: `policy` and `refusal` (what every file reads), `source` (where a reference points, checked),
`fetch` (its bytes, capped), `image` and `audio` (decoding, in worker threads), `load` (the door the routes use). The
room knows HTTP's errors (`http.errors`), nothing of LLMs; the chat route's processor takes what it returns."""

from sagellm.gateway.media.audio import Audio
from sagellm.gateway.media.image import IMAGE_FORMATS
from sagellm.gateway.media.load import audio_bytes, image_bytes, load_image
from sagellm.gateway.media.policy import MediaPolicy, media_policy

__all__ = [
    "IMAGE_FORMATS",
    "Audio",
    "MediaPolicy",
    "audio_bytes",
    "image_bytes",
    "load_image",
    "media_policy",
]
