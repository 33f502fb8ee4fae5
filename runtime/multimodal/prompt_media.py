"""A prompt's images made into what the engine runs: each image preprocessed as the model's Hugging Face processor
does (image_processing.py), its one placeholder token in the prompt expanded into as many as the encoder gives it
rows (as LLaVA's processor repeats `<image>`), and a MediaFeature per image at its placeholders.

The expansion works on token ids, so a prompt given as text and one given as ids (a chat template's rendering)
expand alike; the placeholder is a special token, which tokenizers never merge with its neighbours, so expanding ids
is what expanding the text before tokenizing gives."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from sagellm.common.errors import InvalidInput
from sagellm.runtime.multimodal.image_processing import image_processor_for
from sagellm.runtime.multimodal.media_feature import MediaFeature, media_hash
from sagellm.runtime.multimodal.processed_images import ImageProcessor


class PromptMedia:
    def __init__(self, processor: ImageProcessor, image_token_id: int, tokens_per_image: int) -> None:
        self.processor = processor
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image  # the encoder's rows per image, which the processor must agree on

    @classmethod
    def from_model_dir(cls, directory: Path, image_token_id: int, tokens_per_image: int) -> PromptMedia:
        """From a checkpoint's preprocessor_config.json, or processor_config.json's "image_processor" (where
        transformers 5 writes it), and processor_config.json's counting settings."""
        processor_file = _read_json(directory / "processor_config.json")
        preprocessor = _read_json(directory / "preprocessor_config.json") or processor_file.get("image_processor")
        if not preprocessor:
            raise InvalidInput(f"{directory}: no preprocessor_config.json (nor processor_config.json's image_processor)"
                               ": the model's images cannot be preprocessed")  # fmt: skip
        return cls(image_processor_for(preprocessor, processor_file), image_token_id, tokens_per_image)

    def expand(self, token_ids: Sequence[int], images: Sequence[Image.Image]) -> tuple[list[int], list[MediaFeature]]:
        """The prompt with each image's placeholder repeated for its rows, and the images' features in order."""
        places = [i for i, token in enumerate(token_ids) if token == self.image_token_id]
        if len(places) != len(images):
            raise InvalidInput(f"the prompt has {len(places)} image placeholder(s) and {len(images)} image(s) came "
                               "with it: one placeholder per image")  # fmt: skip
        if not images:
            return list(token_ids), []
        processed = self.processor.preprocess(list(images))
        if any(n != self.tokens_per_image for n in processed.num_tokens):
            raise InvalidInput(f"the images' placeholder counts {processed.num_tokens} differ from the encoder's "
                               f"{self.tokens_per_image} rows per image")  # fmt: skip
        pixels = processed.pixel_values.split(list(processed.pixel_values_per_image))
        expanded: list[int] = []
        features: list[MediaFeature] = []
        last = 0
        for place, image_pixels, n in zip(places, pixels, processed.num_tokens):
            expanded += token_ids[last:place]
            features.append(MediaFeature("image", media_hash(image_pixels), len(expanded), n, image_pixels))
            expanded += [self.image_token_id] * n
            last = place + 1
        return expanded + list(token_ids[last:]), features


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
