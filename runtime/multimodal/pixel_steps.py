"""The steps every family's image preprocessing is built from, each done as the Hugging Face PIL/NumPy backend does
it, so that our pixel values equal theirs bit for bit: RGB conversion (transparency composited onto white), resizes
through PIL on uint8 pixels (PIL's filters round to uint8, so a float resize would differ), the center crop, and
rescale-then-normalize in the same dtypes (a float64 product cast to float32, then float32 arithmetic). An image
travels as a channels-first uint8 array [C, H, W] until it is rescaled; the readers below turn a checkpoint's
preprocessor_config.json values into these steps' settings, where a null value means the family's default, as in HF."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sagellm.common.errors import FieldError, InvalidInput

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # HF's IMAGENET_STANDARD_MEAN and _STD: pixels mapped to [-1, 1]


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


@dataclass(frozen=True)
class Normalization:
    """Rescale (uint8 -> [0, 1] by `rescale_factor`) then normalize ((x - mean) / std per channel); either is None
    when the config turns it off."""

    rescale_factor: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_config(cls, config: Mapping, mean: tuple[float, ...], std: tuple[float, ...]) -> Normalization:
        """Read do_rescale, rescale_factor, do_normalize, image_mean and image_std, `mean` and `std` the defaults."""
        rescale_factor = (
            float(setting(config, "rescale_factor", 1 / 255)) if setting(config, "do_rescale", True) else None
        )
        if not setting(config, "do_normalize", True):
            return cls(rescale_factor, None, None)
        return cls(rescale_factor, per_channel(config, "image_mean", mean), per_channel(config, "image_std", std))

    def apply(self, image: np.ndarray) -> np.ndarray:
        """float32 [C, H, W] of a uint8 [C, H, W]."""
        if self.rescale_factor is None:
            pixels = image.astype(np.float32)
        else:  # the product in float64 and only then float32, as HF's rescale
            pixels = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.mean is None or self.std is None:
            return pixels
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]  # C, 1, 1
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return (pixels - mean) / std


@dataclass(frozen=True)
class ResizeTarget:
    """Where HF's generic resize takes an image: its shortest edge to `shortest_edge` (the aspect ratio kept, the long
    edge rounded down), or exactly `height` x `width`."""

    shortest_edge: int | None = None
    height: int | None = None
    width: int | None = None

    @classmethod
    def from_config(cls, value: object, default_to_square: bool, field: str = "size") -> ResizeTarget:
        """A `size` value as HF's get_size_dict reads it: an int is a square (`default_to_square`) or the shortest
        edge, a pair is (height, width), a dict names its keys."""
        if isinstance(value, int):
            return cls(height=value, width=value) if default_to_square else cls(shortest_edge=value)
        if isinstance(value, list | tuple) and len(value) == 2:
            return cls(height=int(value[0]), width=int(value[1]))
        if isinstance(value, Mapping):
            if set(value) == {"shortest_edge"}:
                return cls(shortest_edge=int(value["shortest_edge"]))
            if set(value) == {"height", "width"}:
                return cls(height=int(value["height"]), width=int(value["width"]))
        raise FieldError(
            field,
            f"{field}: {value!r} is not a size this family takes; give {{'shortest_edge': N}}, "
            "{'height': H, 'width': W} or an int",
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of height x width is resized to."""
        if self.shortest_edge is None:
            return self.height, self.width
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


def setting(config: Mapping, key: str, default: object) -> object:
    """config[key], or `default` where it is absent or null (HF's "unset")."""
    value = config.get(key)
    return default if value is None else value


def per_channel(config: Mapping, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """A per-channel value (image_mean, image_std): a list of three, or one number for all three."""
    value = setting(config, key, default)
    values = (value,) * 3 if isinstance(value, int | float) else tuple(value)
    if len(values) != 3:
        raise FieldError(key, f"{key}: {value!r} must be one number or three (one per RGB channel)")
    return tuple(float(v) for v in values)


def resample_filter(config: Mapping, default: Image.Resampling) -> Image.Resampling:
    """The PIL filter `resample` names (0 nearest, 1 Lanczos, 2 bilinear, 3 bicubic, 4 box, 5 Hamming)."""
    value = setting(config, "resample", default)
    try:
        return Image.Resampling(int(value))
    except (TypeError, ValueError):
        raise FieldError("resample", f"resample: {value!r} is not a PIL filter number (0 to 5)") from None


def positive_int(config: Mapping, key: str, default: int | None) -> int:
    """An integer setting that must be present (in `config` or as `default`) and above zero."""
    value = setting(config, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        where = "missing" if value is None else f"{value!r} is not a positive integer"
        raise FieldError(
            key, f"{key}: {where}; the checkpoint's processor_config.json or preprocessor_config.json gives it"
        )
    return value
