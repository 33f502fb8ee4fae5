"""Random pictures for the multimodal tests: as PIL images (the offline API's multi_modal_data) and as PNG files and
data URLs (what the SDKs send), each the same for the same seed."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def random_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8), "RGB")


def png(seed: int, size: tuple[int, int]) -> bytes:
    """A random picture of `size` (width, height) as a PNG file's bytes."""
    return png_of(random_image(*size, seed))


def png_of(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    """A PNG file as an `image_url` data URL."""
    return "data:image/png;base64," + base64.b64encode(data).decode()
