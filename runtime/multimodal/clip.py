"""CLIP's preprocessing, as LLaVA-1.5 uses it (HF's CLIPImageProcessor, and LlavaImageProcessor, which may first pad
the image to a square of the mean colour): the shortest edge resized (bicubic), the middle crop_size cut out, then
rescale and normalize with OpenAI's CLIP mean and std. The prompt gets (H // patch) * (W // patch) image tokens per
image, plus `num_additional_image_tokens` (the CLS token), less one when `vision_feature_select_strategy` is
"default" (which drops CLS): 576 for LLaVA-1.5's 336-pixel crop of 14-pixel patches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sagellm.common.errors import FieldError
from sagellm.runtime.multimodal.pixel_steps import as_image_list, center_crop, resize, to_rgb
from sagellm.runtime.multimodal.preprocessor_settings import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Normalization,
    ResizeTarget,
    per_channel,
    positive_int,
    resample_filter,
    setting,
)
from sagellm.runtime.multimodal.processed_images import ProcessedImages


@dataclass(frozen=True)
class ClipImageProcessor:
    resize_to: ResizeTarget | None  # None: do_resize off
    crop: tuple[int, int] | None  # (height, width); None: do_center_crop off
    resample: Image.Resampling
    normalization: Normalization
    pad_fill: tuple[int, ...] | None  # LLaVA's do_pad: the square's colour (the mean, in 0..255); None: no padding
    patch_size: int
    num_additional_image_tokens: int = 0
    drop_cls: bool = False  # vision_feature_select_strategy == "default"

    @classmethod
    def from_config(cls, preprocessor: Mapping, processor: Mapping) -> ClipImageProcessor:
        """`processor` (processor_config.json) holds the token-count settings; LLaVA-1.5's has patch_size 14,
        num_additional_image_tokens 1 and vision_feature_select_strategy "default"."""
        crop = None
        if setting(preprocessor, "do_center_crop", True):
            target = ResizeTarget.from_config(setting(preprocessor, "crop_size", 224), True, "crop_size")
            if target.shortest_edge is not None:
                raise FieldError("crop_size", "crop_size: must be {'height': H, 'width': W} or an int")
            crop = (target.height, target.width)
        resize_to = None
        if setting(preprocessor, "do_resize", True):
            resize_to = ResizeTarget.from_config(setting(preprocessor, "size", {"shortest_edge": 224}), False)
        pad_fill = None
        if setting(preprocessor, "do_pad", False):
            pad_fill = tuple(int(x * 255) for x in per_channel(preprocessor, "image_mean", OPENAI_CLIP_MEAN))
        return cls(
            resize_to=resize_to,
            crop=crop,
            resample=resample_filter(preprocessor, Image.Resampling.BICUBIC),
            normalization=Normalization.from_config(preprocessor, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
            pad_fill=pad_fill,
            patch_size=positive_int(processor, "patch_size", preprocessor.get("patch_size")),  # 14 for LLaVA-1.5
            num_additional_image_tokens=int(setting(processor, "num_additional_image_tokens", 0)),
            drop_cls=setting(processor, "vision_feature_select_strategy", None) == "default",
        )

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> ProcessedImages:
        pixels = [self._one(to_rgb(image)) for image in as_image_list(images)]
        num_tokens = tuple(self._num_tokens(*image.shape[1:]) for image in pixels)
        return ProcessedImages(
            pixel_values=torch.from_numpy(np.stack(pixels)),  # N, 3, H, W
            num_tokens=num_tokens,
            pixel_values_per_image=(1,) * len(pixels),
        )

    def _one(self, image: np.ndarray) -> np.ndarray:
        if self.pad_fill is not None:
            image = pad_to_square(image, self.pad_fill)
        if self.resize_to is not None:
            image = resize(image, *self.resize_to.output_size(*image.shape[1:]), self.resample)
        if self.crop is not None:
            image = center_crop(image, *self.crop)
        return self.normalization.apply(image)

    def _num_tokens(self, height: int, width: int) -> int:
        patches = (height // self.patch_size) * (width // self.patch_size)
        return patches + self.num_additional_image_tokens - (1 if self.drop_cls else 0)


def pad_to_square(image: np.ndarray, fill: tuple[int, ...]) -> np.ndarray:
    """[C, H, W] centred on a max(H, W) square of `fill` (LLaVA's pad_to_square), the odd pixel after it."""
    channels, height, width = image.shape
    if height == width:
        return image
    side = max(height, width)
    square = np.empty((channels, side, side), dtype=image.dtype)
    square[:] = np.asarray(fill, dtype=image.dtype)[:, None, None]
    top, left = (side - height) // 2, (side - width) // 2
    square[:, top : top + height, left : left + width] = image
    return square
