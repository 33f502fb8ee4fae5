"""A checkpoint's preprocessor_config.json (and processor_config.json) values read into the settings of the
preprocessing steps (pixel_steps.py): rescale and normalize (`Normalization`, which applies them too), where HF's
generic resize takes an image (`ResizeTarget`), and the readers every family's `from_config` uses. A null value means
the family's default, as in HF; a value no family takes is a FieldError naming its key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sagellm.common.errors import FieldError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # HF's IMAGENET_STANDARD_MEAN and _STD: pixels mapped to [-1, 1]


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
