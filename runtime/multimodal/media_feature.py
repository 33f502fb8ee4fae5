"""One picture or clip of a prompt as the engine carries it (vLLM v1's MultiModalFeatureSpec): an image, one tile of
an image the processor cut into tiles (Idefics3's), or an audio clip, each a run of placeholder tokens: where they
stand, what the encoder reads for it, and the hash that names it.

The placeholder tokens of two images (or clips) are the same ids, so the hash is what tells their KV apart in the
prefix cache (prefix_hash.media_keys) and what finds one already encoded (encoder_cache.py): a digest of the values
the encoder reads, so the same picture or clip sent again, by any request, is the same feature."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class MediaFeature:
    modality: str  # "image" or "audio": which of the model's encoders reads it
    hash: bytes  # media_hash(encoder_input)
    offset: int  # its first placeholder token's position in the prompt
    length: int  # its placeholder tokens: the rows its embeddings fill
    # What the encoder reads for it (a picture's pixel values [1, C, H, W], a clip's log-mel frames [1, mel, F]);
    # None when encoded elsewhere
    encoder_input: torch.Tensor | None
    embeds: torch.Tensor | None = None  # its embeddings [length, H] where an `encode` node computed them
    # Qwen-VL's pictures: (t, h, w), the grid its placeholder tokens form (the patches after merging), from which the
    # text model's multimodal rotary positions are laid out (mrope.py); None for every other family
    grid: tuple[int, int, int] | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    def overlap(self, start: int, end: int) -> range:
        """The positions of its placeholders among [start, end)."""
        return range(max(start, self.offset), min(end, self.end))


def media_hash(encoder_input: torch.Tensor, grid: tuple[int, int, int] | None = None) -> bytes:
    """A 128-bit digest of the values and their shape, and of the picture's `grid` where it has one (Qwen-VL's patch
    rows read alike under two grids of as many patches, and encode differently): equal for the same picture or clip
    preprocessed the same way. Without a grid, the digest is what it always was."""
    values = encoder_input.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.blake2b(repr(tuple(values.shape)).encode(), digest_size=16)
    digest.update(values.numpy().tobytes())
    if grid is not None:
        digest.update(repr(tuple(int(n) for n in grid)).encode())
    return digest.digest()


@dataclass(frozen=True)
class Expansion:
    """What one placeholder of a prompt becomes: its tokens, and the features among them (offsets counted from the
    expansion's first token; prompt_media.PromptMedia puts them in the prompt)."""

    tokens: list[int]
    features: list[MediaFeature]
