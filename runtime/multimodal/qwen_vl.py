"""Qwen2-VL's preprocessing, which Qwen2.5-VL and Qwen3-VL share (HF's Qwen2VLImageProcessor; Qwen3-VL has 16-pixel
patches and a 0.5 mean and std): each image resized (bicubic) to the nearest multiples of patch_size * merge_size
whose area lies within [min_pixels, max_pixels], rescaled, normalized, and flattened into patches of
3 * temporal_patch_size * P * P values (the image repeated over the temporal patch, as a video's frames would be),
ordered so that each merge_size x merge_size group of neighbouring patches is contiguous. The prompt gets
t * h * w / merge_size^2 image tokens per image, one per merged group (Qwen3.5's processor, Qwen3VLProcessor, writes
them as Qwen2-VL's does). The encoder reads each image's own patch rows, and the grid of its tokens beside them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sagellm.common.errors import InvalidInput
from sagellm.runtime.multimodal.pixel_steps import as_image_list, resize, to_rgb
from sagellm.runtime.multimodal.preprocessor_settings import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Normalization,
    positive_int,
    resample_filter,
    setting,
)
from sagellm.runtime.multimodal.processed_images import ProcessedImages

MAX_ASPECT_RATIO = 200  # HF refuses longer ratios: a side would round to fewer than one patch group


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width), multiples of `factor` nearest the image's, scaled down or up to lie within the pixel range."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InvalidInput(
            f"an image of {width} x {height} pixels is too elongated for Qwen-VL: the long side may be at most "
            f"{MAX_ASPECT_RATIO} times the short one"
        )
    new_height, new_width = round(height / factor) * factor, round(width / factor) * factor
    if new_height * new_width > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        new_height = max(factor, math.floor(height / beta / factor) * factor)
        new_width = max(factor, math.floor(width / beta / factor) * factor)
    elif new_height * new_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * beta / factor) * factor
        new_width = math.ceil(width * beta / factor) * factor
    return new_height, new_width


@dataclass(frozen=True)
class QwenVLImageProcessor:
    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    do_resize: bool
    resample: Image.Resampling
    normalization: Normalization

    @classmethod
    def from_config(cls, preprocessor: Mapping) -> QwenVLImageProcessor:
        """min_pixels / max_pixels (Qwen2-VL, Qwen2.5-VL) win over size's shortest_edge / longest_edge (Qwen3-VL)."""
        size = setting(preprocessor, "size", {})
        return cls(
            min_pixels=positive_int(preprocessor, "min_pixels", size.get("shortest_edge", 56 * 56)),
            max_pixels=positive_int(preprocessor, "max_pixels", size.get("longest_edge", 28 * 28 * 1280)),
            patch_size=positive_int(preprocessor, "patch_size", 14),
            temporal_patch_size=positive_int(preprocessor, "temporal_patch_size", 2),
            merge_size=positive_int(preprocessor, "merge_size", 2),
            do_resize=bool(setting(preprocessor, "do_resize", True)),
            resample=resample_filter(preprocessor, Image.Resampling.BICUBIC),
            normalization=Normalization.from_config(preprocessor, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        )

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> ProcessedImages:
        patches, grids = [], []
        for image in as_image_list(images):
            image_patches, grid_h, grid_w = self._patchify(self.normalization.apply(self._resized(to_rgb(image))))
            patches.append(image_patches)
            grids.append((1, grid_h, grid_w))
        merged, m = self.merge_size**2, self.merge_size
        return ProcessedImages(
            pixel_values=torch.from_numpy(np.concatenate(patches)),  # all patches, 3 * T * P * P
            num_tokens=tuple(t * h * w // merged for t, h, w in grids),
            pixel_values_per_image=tuple(t * h * w for t, h, w in grids),
            image_grid_thw=torch.tensor(grids, dtype=torch.int64),  # images, 3
            encoder_inputs=tuple(torch.from_numpy(one) for one in patches),  # each [t * h * w, 3 * T * P * P]
            token_grids=tuple((t, h // m, w // m) for t, h, w in grids),
        )

    def _resized(self, image: np.ndarray) -> np.ndarray:
        factor = self.patch_size * self.merge_size
        _, height, width = image.shape
        if self.do_resize:
            size = smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
            return resize(image, *size, self.resample)
        if height % factor or width % factor:
            raise InvalidInput(
                f"an image of {width} x {height} pixels: with do_resize off, Qwen-VL needs both sides to be "
                f"multiples of patch_size * merge_size = {factor}"
            )
        return image

    def _patchify(self, image: np.ndarray) -> tuple[np.ndarray, int, int]:
        """[grid_h * grid_w, 3 * T * P * P] patches of a float32 [3, H, W], in HF's order: merge groups row-major,
        the patches of a group row-major, each patch's values as (channel, t, y, x)."""
        channels, height, width = image.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        patches = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # gh, gw, mh, mw, C, ph, pw
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))  # ..., C, T, ph, pw
        return patches.reshape(grid_h * grid_w, channels * t * p * p), grid_h, grid_w
