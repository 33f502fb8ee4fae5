"""Encoder outputs kept by their image's hash (vLLM's encoder cache): a prompt whose chunks cross an image reads its
embeddings a slice a step, and the same image in another request, or after a preemption, is not encoded again.
Bounded in rows; the least recently used entries go first."""

from __future__ import annotations

from collections import OrderedDict

import torch

from sagellm.common.errors import InternalError, InvalidInput
from sagellm.runtime.multimodal.encoder_runner import EncoderRunner
from sagellm.runtime.multimodal.media_feature import MediaFeature


class EncoderCache:
    def __init__(self, encoder: EncoderRunner, capacity_rows: int) -> None:
        self.encoder = encoder
        self.capacity_rows = capacity_rows
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._rows = 0
        self.hits = self.misses = 0

    def embeddings(self, feature: MediaFeature) -> torch.Tensor:
        """The feature's embeddings [length, H]: those it carries (an `encode` node's), else encoded now unless
        cached."""
        if feature.embeds is not None:
            return feature.embeds
        cached = self._entries.get(feature.hash)
        if cached is not None:
            self._entries.move_to_end(feature.hash)
            self.hits += 1
            return cached
        self.misses += 1
        if feature.pixel_values is None:
            raise InternalError("a picture encoded elsewhere came without its embeddings")
        (embeds,) = self.encoder.encode(feature.pixel_values)
        if embeds.shape[0] != feature.length:
            raise InvalidInput(f"the encoder gave {embeds.shape[0]} rows for an image of {feature.length} placeholders")
        embeds = embeds.clone()  # its own memory, not a view of the encoder's whole output
        self._entries[feature.hash] = embeds
        self._rows += embeds.shape[0]
        while self._rows > self.capacity_rows and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._rows -= evicted.shape[0]
        return embeds
