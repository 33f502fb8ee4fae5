"""Encoder outputs kept by their picture's or clip's hash (vLLM's encoder cache): a prompt whose chunks cross an
image reads its embeddings a slice a step, and the same image (or clip) in another request, or after a preemption,
is not encoded again. Bounded in rows; the least recently used entries go first. One cache over the model's
encoders, each feature encoded by its modality's."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

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

    def embeddings_of(self, features: Sequence[MediaFeature]) -> list[torch.Tensor]:
        """Each feature's embeddings [length, H], in order: those it carries (an `encode` node's), else cached, else
        encoded now, the pictures not cached encoded together in one pass (an engine's or an `encode` node's step)
        and a clip one at a time."""
        found: dict[bytes, torch.Tensor] = {}
        fresh: dict[bytes, MediaFeature] = {}  # the same picture twice is encoded once
        for f in features:
            if f.embeds is not None or f.hash in found:
                continue
            cached = self._entries.get(f.hash)
            if cached is None:
                fresh.setdefault(f.hash, f)
                continue
            self._entries.move_to_end(f.hash)
            found[f.hash] = cached
        self.misses += len(fresh)
        self.hits += sum(f.embeds is None for f in features) - len(fresh)  # each feature not encoded now
        pictures = [f for f in fresh.values() if f.modality == "image"]
        runs = [pictures] if pictures else []
        runs += [[f] for f in fresh.values() if f.modality != "image"]
        for run in runs:
            grids = [f.grid for f in run] if run[0].grid is not None else None  # Qwen-VL's pictures' token grids
            for f, embeds in zip(run, self._encoder(run[0]).encode(torch.cat([self._input(f) for f in run]), grids)):
                found[f.hash] = self._keep(f, embeds)
        return [f.embeds if f.embeds is not None else found[f.hash] for f in features]

    def _encoder(self, feature: MediaFeature) -> Encoder:
        encoder = self.encoders.get(feature.modality)
        if encoder is None:
            raise InvalidInput(f"this model has no {feature.modality} encoder")
        return encoder

    @staticmethod
    def _input(feature: MediaFeature) -> torch.Tensor:
        if feature.encoder_input is None:
            raise InternalError("a picture or clip encoded elsewhere came without its embeddings")
        return feature.encoder_input

    def _keep(self, feature: MediaFeature, embeds: torch.Tensor) -> torch.Tensor:
        """Checks a feature's fresh embeddings and keeps them, the least recently used going past capacity."""
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
