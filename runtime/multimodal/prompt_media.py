"""A prompt's media made into what the engine runs: each placeholder token of an image or a clip expanded as the
model's Hugging Face processor expands it, and a MediaFeature per picture or clip at its run of placeholders. Each
modality's own work (preprocessing, what a placeholder becomes) is its ModalityPrompts' (image_prompts.py,
audio_prompts.py); this puts their expansions in the prompt, in the order the placeholders stand.

The expansion works on token ids, so a prompt given as text and one given as ids (a chat template's rendering)
expand alike: a placeholder is a special token, which tokenizers never merge with its neighbours (newlines an
expansion begins or ends with are joined with the prompt's beside them: newline_join.py)."""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from PIL import Image

from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.loaded import ProcessorFiles
from sagellm.runtime.multimodal.audio_prompts import AudioPrompts
from sagellm.runtime.multimodal.image_prompts import ImagePrompts
from sagellm.runtime.multimodal.media_feature import Expansion, MediaFeature
from sagellm.runtime.multimodal.newline_join import NewlineJoin
from sagellm.runtime.multimodal.wav import decode_wav

NOUNS = {"image": "image(s)", "audio": "audio clip(s)"}


class ModalityPrompts(Protocol):
    modality: str  # multi_modal_data's key
    placeholder_id: int  # the token each item of it stands for in a prompt
    token_id: int  # the token of each run its expansion holds, whose rows take the embeddings
    max_items: int | None  # the most one prompt may carry (None: no cap)

    def expansions(self, items: Sequence[Any]) -> list[Expansion]:
        """Each item's placeholder tokens and features, in order."""
        ...

    def check_feature(self, feature: MediaFeature) -> None:
        """Refuse a feature encoded elsewhere that does not fit this model."""
        ...


class PromptMedia:
    def __init__(self, modalities: Sequence[ModalityPrompts], newlines: NewlineJoin | None = None) -> None:
        """`newlines`: the tokenizer's, where an expansion may begin or end with newlines (newline_join.py)."""
        self.modalities = {m.modality: m for m in modalities}
        self._by_placeholder = {m.placeholder_id: m for m in modalities}
        self._tokens = {m.token_id for m in modalities}
        self.newlines = newlines

    @classmethod
    def of_model(
        cls, config: ModelConfig, files: ProcessorFiles, tokenizer: Any, limits: Mapping[str, int] | None = None
    ) -> PromptMedia:
        """A loaded model's: its processor's settings (`files`), its encoders' placeholders and sizes, its (Hugging
        Face) tokenizer for the placeholders' text; `limits`: limit_mm_per_prompt's."""
        limits = limits or {}
        preprocessor, processor_file = files.preprocessor, files.processor
        modalities: list[ModalityPrompts] = []
        encode = functools.partial(tokenizer.encode, add_special_tokens=False)
        try:
            if (vision := config.vision) is not None:
                modalities.append(ImagePrompts.from_settings(
                    preprocessor if "image_processor_type" in preprocessor else None, processor_file,
                    vision.image_token_id, vision.tokens_per_image, encode, limits.get("image"),
                    vision.placeholder_token_id, vision.variable_tokens, vision.around_image))  # fmt: skip
            if config.audio is not None:
                modalities.append(AudioPrompts.from_settings(
                    preprocessor if "feature_extractor_type" in preprocessor else None, processor_file,
                    config.audio, limits.get("audio")))  # fmt: skip
        except InvalidInput as error:
            raise InvalidInput(f"{files.origin}: {error}") from None
        return cls(modalities, NewlineJoin(encode, tokenizer.decode))

    def expand(
        self, token_ids: Sequence[int], media: Mapping[str, Sequence[Any]]
    ) -> tuple[list[int], list[MediaFeature]]:
        """The prompt with each item's placeholder expanded, and their features in order; `media`: the items of
        each modality (multi_modal_data's), one per placeholder of it in the prompt, in order. Only the modalities
        `media` names are expanded (an `encode` node's images may come expanded, a clip's placeholder not)."""
        if unknown := media.keys() - self.modalities.keys():
            raise InvalidInput(f"this model takes no {', '.join(sorted(unknown))}: it has no encoder for it")
        expansions: dict[str, list[Expansion]] = {}
        for modality, items in media.items():
            prompts, items = self.modalities[modality], list(items or ())
            noun = NOUNS.get(modality, modality)
            if prompts.max_items is not None and len(items) > prompts.max_items:
                raise InvalidInput(f"at most {prompts.max_items} {noun} may be given in one prompt "
                                   f"(limit_mm_per_prompt); this one has {len(items)}")  # fmt: skip
            places = sum(t == prompts.placeholder_id for t in token_ids)
            if places != len(items):
                raise InvalidInput(f"the prompt has {places} {modality} placeholder(s) and {len(items)} {noun} came "
                                   f"with it: one placeholder per {modality}")  # fmt: skip
            expansions[modality] = list(reversed(prompts.expansions(items))) if items else []
        if not any(expansions.values()):
            return list(token_ids), []
        expanded: list[int] = []
        features: list[MediaFeature] = []
        after_expansion = False
        for token in token_ids:
            prompts = self._by_placeholder.get(token)
            if prompts is None or prompts.modality not in expansions:
                self._append(expanded, [token], after_expansion)
                after_expansion = False
                continue
            expansion = expansions[prompts.modality].pop()
            self._append(expanded, expansion.tokens, True)
            start = len(expanded) - len(expansion.tokens)  # where its first token would stand (newlines may join)
            features += [dataclasses.replace(f, offset=start + f.offset) for f in expansion.features]
            after_expansion = True
        return expanded, features

    def _append(self, ids: list[int], tokens: list[int], edge: bool) -> None:
        if self.newlines is None:
            ids += tokens
        else:
            self.newlines.append(ids, tokens, edge)

    def check_encoded(self, token_ids: Sequence[int], features: Sequence[MediaFeature]) -> None:
        """Pictures and clips an `encode` node expanded and encoded: each its run of placeholders in the prompt
        (already expanded), its embeddings one per placeholder, and no placeholder left without them."""
        covered = 0
        for f in features:
            prompts = self.modalities.get(f.modality)
            if prompts is None:
                raise InvalidInput(f"this model takes no {f.modality}")
            if f.embeds is None or f.embeds.shape[0] != f.length:
                raise InvalidInput(f"an encoded {f.modality} of {f.length} placeholders came with embeddings of "
                                   f"shape {None if f.embeds is None else tuple(f.embeds.shape)}")  # fmt: skip
            prompts.check_feature(f)
            tokens = token_ids[f.offset : f.end]
            if f.offset < 0 or f.end > len(token_ids) or any(t != prompts.token_id for t in tokens):
                raise InvalidInput(f"an encoded {f.modality}'s placeholders at {f.offset}..{f.end} are not its tokens")
            covered += f.length
        if covered != sum(t in self._tokens for t in token_ids):
            raise InvalidInput("the prompt's placeholders and its encoded pictures and clips do not pair up")


def decoded_media(images: Sequence[bytes] | None, audios: Sequence[bytes] | None) -> dict[str, list[Any]]:
    """A request's image and WAV files (as it carries them) as multi_modal_data: {"image": [...], "audio": [...]},
    each key only where it has files."""
    data: dict[str, list[Any]] = {}
    if images:
        data["image"] = decoded_images(images)
    if audios:
        data["audio"] = [decode_wav(clip) for clip in audios]
    return data


def decoded_images(files: Sequence[bytes]) -> list[Image.Image]:
    """Images as a request carries them (their files' bytes, checked where they were fetched), decoded."""
    images = []
    for data in files:
        image = Image.open(io.BytesIO(data))
        image.load()
        images.append(image)
    return images
