"""The rows of a step that hold image placeholders, and the embeddings that replace their token embeddings: for each
sequence, its images' placeholders among the positions the step computes, sliced from the image's encoder output (an
image whose placeholders a chunked prefill splits is encoded once, read a slice a chunk; one a prefix hit covers
is not read at all)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from sagellm.runtime.multimodal.encoder_cache import EncoderCache

if TYPE_CHECKING:
    from sagellm.runtime.multimodal.media_feature import MediaFeature


def step_media(
    scheduled: Iterable[tuple[list[MediaFeature], int, int]], encoder: EncoderCache, device: torch.device
) -> dict[str, torch.Tensor | None]:
    """`scheduled`: each sequence's (features, first position computed, positions computed) in the step's row order
    -> the decoder graph's mm_rows [M] and mm_embeds [M, H] (both None for a step without placeholders)."""
    rows: list[int] = []
    read: list[tuple[MediaFeature, range]] = []  # each feature the step reads, and the positions it reads
    first_row = 0
    for features, start, n in scheduled:
        for feature in features:
            span = feature.overlap(start, start + n)
            if span:
                rows.extend(range(first_row + span.start - start, first_row + span.stop - start))
                read.append((feature, span))
        first_row += n
    if not rows:
        return {"mm_rows": None, "mm_embeds": None}
    whole = encoder.embeddings_of([feature for feature, _ in read])  # the step's uncached pictures in one pass
    embeds = [e[span.start - f.offset : span.stop - f.offset] for (f, span), e in zip(read, whole, strict=True)]
    return {"mm_rows": torch.tensor(rows, dtype=torch.int64, device=device), "mm_embeds": torch.cat(embeds)}
