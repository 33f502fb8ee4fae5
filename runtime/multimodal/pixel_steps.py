"""The steps every family's image preprocessing is built from, each done as the Hugging Face PIL/NumPy backend does
it, so that our pixel values equal theirs bit for bit: RGB conversion (transparency composited onto white), resizes
through PIL on uint8 pixels (PIL's filters round to uint8, so a float resize would differ), the center crop, and
rescale-then-normalize in the same dtypes (a float64 product cast to float32, then float32 arithmetic:
preprocessor_settings.Normalization, beside the settings it reads). An image travels as a channels-first uint8 array
[C, H, W] until it is rescaled."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from sagellm.common.errors import InvalidInput


def as_image_list(images: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
    """One image or a sequence of them (one prompt's images, in prompt order) as a non-empty list of PIL images."""
    listed = [images] if isinstance(images, Image.Image) else list(images)
    if not listed:
        raise InvalidInput("no images to preprocess: pass one PIL image or a non-empty list of them")
    for image in listed:
        if not isinstance(image, Image.Image):
            raise InvalidInput(f"an image must be a PIL.Image.Image, got {type(image).__name__}")
    return listed


def to_rgb(image: Image.Image) -> np.ndarray:
    """[3, H, W] uint8 of an image of any PIL mode. Transparency (an alpha band, or a palette's or L image's
    transparent colour) is composited onto white, as HF's convert_to_rgb does; other modes (L, P, CMYK, I;16, ...)
    go through PIL's own conversion."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB")).transpose(2, 0, 1)  # H, W, 3 -> 3, H, W


def resize(image: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    """[C, H, W] uint8 resized to [C, height, width] by PIL, on uint8 pixels as HF's PIL backend does."""
    resized = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).resize((width, height), resample)
    return np.asarray(resized).transpose(2, 0, 1)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The middle height x width of [C, H, W]. Where the image is smaller it is first zero-padded to fit, the odd
    pixel of padding before it rather than after (HF's ceil), so the crop is always height x width."""
    _, image_height, image_width = image.shape
    top, left = (image_height - height) // 2, (image_width - width) // 2
    if top >= 0 and left >= 0:
        return image[:, top : top + height, left : left + width]
    padded_height, padded_width = max(height, image_height), max(width, image_width)
    pad_top, pad_left = math.ceil((padded_height - image_height) / 2), math.ceil((padded_width - image_width) / 2)
    padded = np.zeros((image.shape[0], padded_height, padded_width), dtype=image.dtype)
    padded[:, pad_top : pad_top + image_height, pad_left : pad_left + image_width] = image
    top, left = top + pad_top, left + pad_left
    return padded[:, max(0, top) : min(padded_height, top + height), max(0, left) : min(padded_width, left + width)]
