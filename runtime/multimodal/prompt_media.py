"""A prompt's images made into what the engine runs: each image preprocessed as the model's Hugging Face processor
does (image_processing.py), its one placeholder token in the prompt expanded as that processor expands it, and a
MediaFeature per picture the encoder reads (an image, or one tile of an image cut into tiles) at its run of image
tokens.

The expansion works on token ids, so a prompt given as text and one given as ids (a chat template's rendering)
expand alike: the placeholder is a special token, which tokenizers never merge with its neighbours, and what it
becomes begins and ends with one (LLaVA's image tokens repeated; Idefics3's tiles between <fake_token_around_image>
tags), so expanding ids is what expanding the text before tokenizing gives."""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.vision_config import VisionConfig
from sagellm.runtime.multimodal.image_processing import image_processor_for
from sagellm.runtime.multimodal.media_feature import MediaFeature, media_hash
from sagellm.runtime.multimodal.processed_images import ImageProcessor, ProcessedImages


class PromptMedia:
    def __init__(
        self,
        processor: ImageProcessor,
        image_token_id: int,
        tokens_per_image: int,
        encode: Callable[[str], list[int]],
        max_images: int | None = None,
    ) -> None:
        """`tokens_per_image`: the encoder's embeddings per picture, which every run of image tokens must match;
        `encode`: the tokenizer, without special tokens added (for a placeholder's text); `max_images`: the most
        images a prompt may carry (limit_mm_per_prompt's; None: no cap)."""
        self.processor = processor
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.encode = encode
        self.max_images = max_images

    @classmethod
    def from_model_dir(
        cls,
        directory: Path,
        image_token_id: int,
        tokens_per_image: int,
        encode: Callable[[str], list[int]],
        max_images: int | None = None,
    ) -> PromptMedia:
        """From a checkpoint's preprocessor_config.json, or processor_config.json's "image_processor" (where
        transformers 5 writes it), and processor_config.json's counting settings."""
        processor_file = _read_json(directory / "processor_config.json")
        preprocessor = _read_json(directory / "preprocessor_config.json") or processor_file.get("image_processor")
        if not preprocessor:
            raise InvalidInput(f"{directory}: no preprocessor_config.json (nor processor_config.json's image_processor)"
                               ": the model's images cannot be preprocessed")  # fmt: skip
        processor = image_processor_for(preprocessor, processor_file)
        return cls(processor, image_token_id, tokens_per_image, encode, max_images)

    @classmethod
    def of_model(cls, vision: VisionConfig, directory: Path, tokenizer: Any, max_images: int | None) -> PromptMedia:
        """A loaded model's: its checkpoint `directory`, its vision encoder's placeholder and embeddings per picture,
        its (Hugging Face) tokenizer for the placeholders' text."""
        encode = functools.partial(tokenizer.encode, add_special_tokens=False)
        return cls.from_model_dir(directory, vision.image_token_id, vision.tokens_per_image, encode, max_images)

    def expand(self, token_ids: Sequence[int], images: Sequence[Image.Image]) -> tuple[list[int], list[MediaFeature]]:
        """The prompt with each image's placeholder expanded, and its pictures' features in order."""
        if self.max_images is not None and len(images) > self.max_images:
            raise InvalidInput(f"at most {self.max_images} image(s) may be given in one prompt (limit_mm_per_prompt)"
                               f"; this one has {len(images)}")  # fmt: skip
        places = [i for i, token in enumerate(token_ids) if token == self.image_token_id]
        if len(places) != len(images):
            raise InvalidInput(f"the prompt has {len(places)} image placeholder(s) and {len(images)} image(s) came "
                               "with it: one placeholder per image")  # fmt: skip
        if not images:
            return list(token_ids), []
        processed = self.processor.preprocess(list(images))
        pictures = processed.pixel_values.reshape(-1, *processed.pixel_values.shape[-3:])  # [pictures, C, H, W]
        per_image = pictures.split(list(processed.pixel_values_per_image))
        expanded: list[int] = []
        features: list[MediaFeature] = []
        last = 0
        for i, (place, image_pictures) in enumerate(zip(places, per_image)):
            expanded += token_ids[last:place]
            placeholders = self._placeholders(processed, i)
            features += self._features(placeholders, image_pictures, len(expanded))
            expanded += placeholders
            last = place + 1
        return expanded + list(token_ids[last:]), features

    def check_encoded(self, token_ids: Sequence[int], features: Sequence[MediaFeature]) -> None:
        """Pictures an `encode` node expanded and encoded: each its run of image tokens in the prompt (already
        expanded), its embeddings one per placeholder, and no image token left without them."""
        covered = 0
        for f in features:
            if f.embeds is None or f.embeds.shape[0] != f.length or f.length != self.tokens_per_image:
                raise InvalidInput(f"an encoded picture of {f.length} placeholders came with embeddings of shape "
                                   f"{None if f.embeds is None else tuple(f.embeds.shape)}")  # fmt: skip
            if (
                f.offset < 0
                or any(t != self.image_token_id for t in token_ids[f.offset : f.end])
                or f.end > len(token_ids)
            ):
                raise InvalidInput(f"an encoded picture's placeholders at {f.offset}..{f.end} are not image tokens")
            covered += f.length
        if covered != sum(t == self.image_token_id for t in token_ids):
            raise InvalidInput("the prompt's image tokens and its encoded pictures do not pair up")

    def _placeholders(self, processed: ProcessedImages, i: int) -> list[int]:
        """What image i's placeholder becomes: its text tokenized where the processor writes one, else its image
        tokens."""
        if processed.placeholder_texts is not None:
            return self.encode(processed.placeholder_texts[i])
        return [self.image_token_id] * processed.num_tokens[i]

    def _features(self, placeholders: list[int], pictures: torch.Tensor, offset: int) -> list[MediaFeature]:
        """A feature per run of image tokens among `placeholders` (which start at `offset` in the prompt), the
        pictures [n, C, H, W] in order: one run each, each as long as the encoder's embeddings of one."""
        runs = _runs(placeholders, self.image_token_id)
        lengths = [n for _, n in runs]
        if len(runs) != len(pictures) or any(n != self.tokens_per_image for n in lengths):
            raise InvalidInput(f"the image's {len(pictures)} picture(s) took runs of {lengths} image tokens in the "
                               f"prompt; the encoder gives {self.tokens_per_image} per picture: the checkpoint's "
                               "processor and model disagree")  # fmt: skip
        return [MediaFeature("image", media_hash(picture[None]), offset + start, n, picture[None])
                for (start, n), picture in zip(runs, pictures)]  # fmt: skip


def _runs(ids: Sequence[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each run of `token` in `ids`."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(ids):
        if t != token:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def decoded_images(files: Sequence[bytes]) -> list[Image.Image]:
    """Images as a request carries them (their files' bytes, checked where they were fetched), decoded."""
    images = []
    for data in files:
        image = Image.open(io.BytesIO(data))
        image.load()
        images.append(image)
    return images


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path}: {exc}") from None
