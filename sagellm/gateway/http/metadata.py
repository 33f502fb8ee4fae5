"""OpenAI's `metadata` on the objects it keeps (responses, conversations, batches): at most MAX_METADATA pairs, keys
of at most 64 characters and values of at most 512, as OpenAI bounds them. One type, so every body that takes it
refuses the same things with a 400 naming the field."""

from __future__ import annotations

from typing import Annotated

import msgspec

from sagellm.runtime.engine.request_limits import MAX_METADATA

MAX_KEY_CHARS, MAX_VALUE_CHARS = 64, 512
Metadata = Annotated[
    dict[
        Annotated[str, msgspec.Meta(max_length=MAX_KEY_CHARS)], Annotated[str, msgspec.Meta(max_length=MAX_VALUE_CHARS)]
    ],
    msgspec.Meta(max_length=MAX_METADATA),
]
