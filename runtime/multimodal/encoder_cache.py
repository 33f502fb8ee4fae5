"""Encoder outputs kept by their picture's or clip's hash (vLLM's encoder cache): a prompt whose chunks cross an
image reads its embeddings a slice a step, and the same image (or clip) in another request, or after a preemption,
is not encoded again. Bounded in rows; the least recently used entries go first. One cache over the model's
encoders, each feature encoded by its modality's."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch

from sagellm.common.errors import InternalError, InvalidInput
from sagellm.runtime.multimodal.encoder_runner import Encoder
from sagellm.runtime.multimodal.media_feature import MediaFeature


class EncoderCache:
    def __init__(self, encoders: Mapping[str, Encoder], capacity_rows: int) -> None:
        """`encoders`: the model's, by the modality each reads ("image", "audio")."""
        self.encoders = dict(encoders)
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
        if feature.encoder_input is None:
            raise InternalError("a picture or clip encoded elsewhere came without its embeddings")
        encoder = self.encoders.get(feature.modality)
        if encoder is None:
            raise InvalidInput(f"this model has no {feature.modality} encoder")
        (embeds,) = encoder.encode(feature.encoder_input)
        if embeds.shape[0] != feature.length:
            raise InvalidInput(f"the encoder gave {embeds.shape[0]} rows for {feature.modality} of "
                               f"{feature.length} placeholders")  # fmt: skip
        embeds = embeds.clone()  # its own memory, not a view of the encoder's whole output
        self._entries[feature.hash] = embeds
        self._rows += embeds.shape[0]
        while self._rows > self.capacity_rows and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._rows -= evicted.shape[0]
        return embeds
