"""Where a Qwen-VL prompt's tokens stand for the text model's multimodal rope (transformers' `get_rope_index`, for
images): a picture's tokens form its (t, h, w) grid and stand at (s + i, s + j, s + k), s the position its first
token would have had; the text after it goes on from s + the grid's longest side, not from s + its token count, so
every token past a picture stands `shift` before its index (negative: a picture's tokens outnumber its side).

Only the features with a `grid` (Qwen-VL's pictures) move anything: a prompt without them has its tokens at their
indices, as a text model's."""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.runtime.multimodal.media_feature import MediaFeature


def shift(features: Sequence[MediaFeature], end: int) -> int:
    """How far the position of the token at index `end` (not inside a picture) lies from `end`: the sum over the
    pictures before it of the grid's longest side less its tokens."""
    return sum(max(f.grid) - f.length for f in features if f.grid is not None and f.end <= end)


def token_positions(
    features: Sequence[MediaFeature], start: int, n: int
) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    """Tokens [start, start + n)'s positions, and (i, t, h, w) for each of them that is a picture's (its index i
    among the n and its three positions; its entry in the first list is then its time position). `features`: the
    sequence's, in prompt order."""
    pictures = [f for f in features if f.grid is not None and f.end > start]
    moved = shift(features, start)
    positions: list[int] = []
    three: list[tuple[int, int, int, int]] = []
    for p in range(start, start + n):
        while pictures and pictures[0].end <= p:
            moved += max(pictures[0].grid) - pictures[0].length
            pictures.pop(0)
        if not pictures or pictures[0].offset > p:
            positions.append(p + moved)
            continue
        picture, k = pictures[0], p - pictures[0].offset
        first = picture.offset + moved  # where the picture's grid starts
        _, height, width = picture.grid
        t = first + k // (height * width)
        positions.append(t)
        three.append((p - start, t, first + k // width % height, first + k % width))
    return positions, three
