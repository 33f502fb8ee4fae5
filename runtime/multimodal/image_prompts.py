"""A prompt's images made into what the engine runs: each image preprocessed as the model's Hugging Face processor
does (image_processing.py), its one placeholder token expanded as that processor expands it, and a MediaFeature per
picture the encoder reads (an image, or one tile of an image cut into tiles) at its run of image tokens.

What a placeholder becomes begins and ends with a special token (LLaVA's image tokens repeated; Idefics3's tiles
between <fake_token_around_image> tags), which tokenizers never merge with its neighbours, so expanding ids is what
expanding the text before tokenizing gives; Gemma 3's blank lines around <start_of_image> ... <end_of_image> are
the exception, joined with the newlines beside them (prompt_media.py)."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from sagellm.common.errors import InvalidInput
from sagellm.runtime.multimodal.image_processing import image_processor_for
from sagellm.runtime.multimodal.media_feature import Expansion, MediaFeature, media_hash
from sagellm.runtime.multimodal.processed_images import ImageProcessor, ProcessedImages


class ImagePrompts:
    modality = "image"

    def __init__(
        self,
        processor: ImageProcessor,
        image_token_id: int,
        tokens_per_image: int,
        encode: Callable[[str], list[int]],
        max_items: int | None = None,
        placeholder_id: int | None = None,
        variable_tokens: bool = False,
        around: tuple[int, int] | None = None,
    ) -> None:
        """`tokens_per_image`: the encoder's embeddings per picture, which every run of image tokens must match
        (with `variable_tokens`, Gemma 4's and Qwen-VL's, the most a run may hold: each picture's is its own);
        `encode`: the tokenizer, without special tokens added (for a placeholder's text); `max_items`: the most
        images a prompt may carry (limit_mm_per_prompt's; None: no cap); `placeholder_id`: the token a prompt
        carries per image where it is not the image token (Gemma 3's <start_of_image>); `around`: the tokens before
        and after each run of image tokens (Gemma 4's <boi> and <eoi>)."""
        self.processor = processor
        self.placeholder_id = image_token_id if placeholder_id is None else placeholder_id
        self.token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.encode = encode
        self.max_items = max_items
        self.variable_tokens = variable_tokens
        self.around = around

    @classmethod
    def from_settings(
        cls,
        preprocessor: Mapping | None,
        processor_file: Mapping,
        image_token_id: int,
        tokens_per_image: int,
        encode: Callable[[str], list[int]],
        max_items: int | None = None,
        placeholder_id: int | None = None,
        variable_tokens: bool = False,
        around: tuple[int, int] | None = None,
    ) -> ImagePrompts:
        """From a checkpoint's preprocessor_config.json, or processor_config.json's "image_processor" (where
        transformers 5 writes it), and processor_config.json's counting settings."""
        preprocessor = preprocessor or processor_file.get("image_processor")
        if not preprocessor:
            raise InvalidInput("no preprocessor_config.json (nor processor_config.json's image_processor): the "
                               "model's images cannot be preprocessed")  # fmt: skip
        processor = image_processor_for(preprocessor, processor_file)
        return cls(processor, image_token_id, tokens_per_image, encode, max_items, placeholder_id, variable_tokens,
                   around)  # fmt: skip

    def expansions(self, images: Sequence[Any]) -> list[Expansion]:
        """Each image's placeholder tokens and its pictures' features (offsets from the expansion's start)."""
        processed = self.processor.preprocess([_image(image) for image in images])
        if processed.encoder_inputs is not None:  # pictures the encoder reads otherwise (Gemma 4's, Qwen-VL's rows)
            per_image = [[picture] for picture in processed.encoder_inputs]
        else:
            pictures = processed.pixel_values.reshape(-1, *processed.pixel_values.shape[-3:])  # [pictures, C, H, W]
            per_image = pictures.split(list(processed.pixel_values_per_image))
        grids = processed.token_grids or (None,) * len(per_image)
        out = []
        for i, (image_pictures, grid) in enumerate(zip(per_image, grids)):
            placeholders = self._placeholders(processed, i)
            out.append(Expansion(placeholders, self._features(placeholders, image_pictures, grid)))
        return out

    def check_feature(self, feature: MediaFeature) -> None:
        if self.variable_tokens and 0 < feature.length <= self.tokens_per_image:
            return
        if feature.length != self.tokens_per_image:
            raise InvalidInput(f"an encoded picture of {feature.length} placeholders: the encoder gives "
                               f"{self.tokens_per_image} per picture")  # fmt: skip

    def _placeholders(self, processed: ProcessedImages, i: int) -> list[int]:
        """What image i's placeholder becomes: its text tokenized where the processor writes one, else its image
        tokens."""
        if processed.placeholder_texts is not None:
            return self.encode(processed.placeholder_texts[i])
        run = [self.token_id] * processed.num_tokens[i]
        return run if self.around is None else [self.around[0], *run, self.around[1]]

    def _features(
        self, placeholders: list[int], pictures: Sequence[torch.Tensor], grid: tuple[int, int, int] | None = None
    ) -> list[MediaFeature]:
        """A feature per run of image tokens among `placeholders`, the pictures (each [C, H, W], or Gemma 4's or
        Qwen-VL's patch rows [P, K] read whole) in order: one run each, each as long as the encoder's embeddings of
        one; `grid`: the grid of a Qwen-VL picture's tokens, which its feature carries and its hash covers."""
        runs = _runs(placeholders, self.token_id)
        lengths = [n for _, n in runs]
        if self.variable_tokens:
            if len(runs) != len(pictures) or any(n > self.tokens_per_image for n in lengths):
                raise InvalidInput(f"the image's {len(pictures)} picture(s) took runs of {lengths} image tokens in "
                                   f"the prompt: one run a picture, of at most {self.tokens_per_image}")  # fmt: skip
            return [MediaFeature("image", media_hash(picture, grid), start, n, picture, grid=grid)
                    for (start, n), picture in zip(runs, pictures)]  # fmt: skip
        if len(runs) != len(pictures) or any(n != self.tokens_per_image for n in lengths):
            raise InvalidInput(f"the image's {len(pictures)} picture(s) took runs of {lengths} image tokens in the "
                               f"prompt; the encoder gives {self.tokens_per_image} per picture: the checkpoint's "
                               "processor and model disagree")  # fmt: skip
        return [MediaFeature("image", media_hash(picture[None]), start, n, picture[None])
                for (start, n), picture in zip(runs, pictures)]  # fmt: skip


def _image(item: Any) -> Image.Image:
    """An image as multi_modal_data holds it: a PIL image, or its file's bytes (as requests carry them)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(item))
        image.load()
        return image
    if not isinstance(item, Image.Image):
        raise InvalidInput(f"an image must be a PIL image or an image file's bytes, not {type(item).__name__}")
    return item


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
