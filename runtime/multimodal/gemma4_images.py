"""Gemma 4's image preprocessing, equal to transformers' Gemma4ImageProcessorPil: each image resized (bicubic) to
the largest size of its aspect ratio whose sides are multiples of pooling_kernel_size * patch_size and whose patches
number at most max_soft_tokens * pooling_kernel_size^2, rescaled to [0, 1] (not normalized), cut into patches
(row-major, each flattened (row, column, channel)) with each patch's (x, y), and padded to that most with zero
patches at (-1, -1). An image gives its patches / pooling_kernel_size^2 soft tokens (`num_tokens`), which
Gemma4Processor writes between <boi> and <eoi> in place of the prompt's image token (image_prompts.py, from the
config's boi_token_id and eoi_token_id).

The encoder reads each image's own patches and positions alone (gemma4_vision.patch_rows), not the padding."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sagellm.backends.torch_ops.gemma4_vision import patch_rows
from sagellm.common.errors import FieldError, InvalidInput
from sagellm.runtime.multimodal.pixel_steps import as_image_list, resize, to_rgb
from sagellm.runtime.multimodal.preprocessor_settings import (
    Normalization,
    positive_int,
    resample_filter,
    setting,
)
from sagellm.runtime.multimodal.processed_images import ProcessedImages

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # Gemma4ImageProcessor's max_soft_tokens choices


def aspect_ratio_preserving_size(height: int, width: int, patch: int, max_patches: int, kernel: int) -> tuple[int, int]:
    """transformers' get_aspect_ratio_preserving_size: the resized (height, width)."""
    target_px = max_patches * patch**2
    factor = math.sqrt(target_px / (height * width))
    side = kernel * patch
    target_height = int(math.floor(factor * height / side)) * side
    target_width = int(math.floor(factor * width / side)) * side
    if target_height == 0 and target_width == 0:
        raise InvalidInput(f"an image of {width} x {height} pixels is too elongated to resize for Gemma 4")
    longest = (max_patches // kernel**2) * side
    if target_height == 0:
        target_height, target_width = side, min(int(math.floor(width / height)) * side, longest)
    elif target_width == 0:
        target_width, target_height = side, min(int(math.floor(height / width)) * side, longest)
    if target_height * target_width > target_px:
        raise InvalidInput(f"an image of {width} x {height} pixels would resize past {max_patches} patches")
    return target_height, target_width


@dataclass(frozen=True)
class Gemma4ImageProcessor:
    patch_size: int
    max_soft_tokens: int
    pooling_kernel_size: int
    resample: Image.Resampling
    normalization: Normalization
    do_resize: bool = True

    @classmethod
    def from_config(cls, preprocessor: Mapping, processor: Mapping) -> Gemma4ImageProcessor:
        """From Gemma4ImageProcessor's preprocessor_config.json (its defaults where a key is absent or null)."""
        max_soft_tokens = positive_int(preprocessor, "max_soft_tokens", 280)
        if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise FieldError("max_soft_tokens", f"max_soft_tokens: {max_soft_tokens} is not one of "
                             f"{SUPPORTED_SOFT_TOKENS}")  # fmt: skip
        defaults = {"do_normalize": False} | {k: v for k, v in preprocessor.items() if v is not None}
        return cls(
            patch_size=positive_int(preprocessor, "patch_size", 16),
            max_soft_tokens=max_soft_tokens,
            pooling_kernel_size=positive_int(preprocessor, "pooling_kernel_size", 3),
            resample=resample_filter(preprocessor, Image.Resampling.BICUBIC),
            normalization=Normalization.from_config(defaults, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
            do_resize=bool(setting(preprocessor, "do_resize", True)),
        )

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> ProcessedImages:
        patches, positions, tokens = [], [], []
        for image in as_image_list(images):
            one, where = self._one(to_rgb(image))
            patches.append(one)
            positions.append(where)
            tokens.append(one.shape[0] // self.pooling_kernel_size**2)
        padded = np.zeros((len(patches), self.max_patches, patches[0].shape[1]), dtype=np.float32)
        padded_positions = np.full((len(patches), self.max_patches, 2), -1, dtype=np.int64)
        for i, (one, where) in enumerate(zip(patches, positions)):
            padded[i, : len(one)], padded_positions[i, : len(one)] = one, where
        return ProcessedImages(
            pixel_values=torch.from_numpy(padded),  # [images, max_patches, 3 * p * p]
            num_tokens=tuple(tokens),
            pixel_values_per_image=(1,) * len(patches),
            image_position_ids=torch.from_numpy(padded_positions),
            encoder_inputs=tuple(
                patch_rows(torch.from_numpy(one), torch.from_numpy(where)) for one, where in zip(patches, positions)
            ),
        )

    def _one(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[3, H, W] uint8 -> its patches float32 [P, 3 * p * p] and their (x, y) int64 [P, 2]."""
        p = self.patch_size
        if self.do_resize:
            height, width = aspect_ratio_preserving_size(image.shape[1], image.shape[2], p, self.max_patches,
                                                         self.pooling_kernel_size)  # fmt: skip
            if (height, width) != image.shape[1:]:
                image = resize(image, height, width, self.resample)
        pixels = self.normalization.apply(image)  # [3, H, W] float32
        channels, rows, columns = pixels.shape[0], pixels.shape[1] // p, pixels.shape[2] // p
        patches = pixels.reshape(channels, rows, p, columns, p).transpose(1, 3, 2, 4, 0).reshape(rows * columns, -1)
        x, y = np.meshgrid(np.arange(columns), np.arange(rows), indexing="xy")
        return np.ascontiguousarray(patches), np.stack([x, y], axis=-1).reshape(-1, 2)
