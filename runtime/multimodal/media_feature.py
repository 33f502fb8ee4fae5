"""One picture of a prompt as the engine carries it (vLLM v1's MultiModalFeatureSpec): an image, or one tile of an
image the processor cut into tiles (Idefics3's), each a run of placeholder tokens: where they stand, what the encoder
reads for it, and the hash that names it.

The placeholder tokens of two images are the same ids, so the hash is what tells their KV apart in the prefix cache
(prefix_hash.media_keys) and what finds an image already encoded (encoder_cache.py): a digest of the pixel values the
encoder reads, so the same picture sent again, by any request, is the same feature."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class MediaFeature:
    modality: str  # "image"
    hash: bytes  # media_hash(pixel_values)
    offset: int  # its first placeholder token's position in the prompt
    length: int  # its placeholder tokens: the rows its embeddings fill
    pixel_values: torch.Tensor | None  # what the encoder reads for it ([1, C, H, W]); None when encoded elsewhere
    embeds: torch.Tensor | None = None  # its embeddings [length, H] where an `encode` node computed them

    @property
    def end(self) -> int:
        return self.offset + self.length

    def overlap(self, start: int, end: int) -> range:
        """The positions of its placeholders among [start, end)."""
        return range(max(start, self.offset), min(end, self.end))


def media_hash(pixel_values: torch.Tensor) -> bytes:
    """A 128-bit digest of the values and their shape: equal for the same picture preprocessed the same way."""
    values = pixel_values.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.blake2b(repr(tuple(values.shape)).encode(), digest_size=16)
    digest.update(values.numpy().tobytes())
    return digest.digest()
