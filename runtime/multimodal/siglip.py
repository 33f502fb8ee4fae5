"""SigLIP's preprocessing, as Gemma 3 (HF's Gemma3ImageProcessor) and PaliGemma (SiglipImageProcessor) use it: the
whole image resized to one fixed size (896 x 896 for Gemma 3; bilinear for Gemma 3, bicubic for SigLIP), rescaled
and normalized to [-1, 1]. Gemma 3 may also pan and scan: a wide or tall image adds crops along its long side, each
preprocessed as an image of its own after the whole one. The prompt gets `image_seq_length` image tokens (Gemma 3's
mm_tokens_per_image, 256) for the image and as many again for each crop; Gemma 3's each between <start_of_image> and
<end_of_image> with blank lines around (`placeholder_texts`, as Gemma3Processor writes them)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sagellm.common.errors import FieldError
from sagellm.runtime.multimodal.pixel_steps import as_image_list, resize, to_rgb
from sagellm.runtime.multimodal.preprocessor_settings import (
    HALF,
    Normalization,
    ResizeTarget,
    positive_int,
    resample_filter,
    setting,
)
from sagellm.runtime.multimodal.processed_images import ProcessedImages

# Gemma 3's image tokens, as every Gemma 3 tokenizer spells them (its processor reads them from the tokenizer)
GEMMA3_BOI, GEMMA3_IMAGE, GEMMA3_EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"


@dataclass(frozen=True)
class PanAndScan:
    """Gemma 3's crops of an elongated image; defaults are Gemma3Processor's, which the checkpoint leaves null."""

    min_crop_size: int = 256
    max_num_crops: int = 4
    min_ratio_to_activate: float = 1.2

    def crops(self, image: np.ndarray) -> list[np.ndarray]:
        """The crops of [C, H, W] (none when it is not elongated enough or a crop would be too small), row-major."""
        _, height, width = image.shape
        long, short = max(width, height), min(width, height)
        if long / short < self.min_ratio_to_activate:
            return []
        num_crops = min(int(math.floor(long / short + 0.5)), int(math.floor(long / self.min_crop_size)))
        num_crops = min(self.max_num_crops, max(2, num_crops))
        crops_w, crops_h = (num_crops, 1) if width >= height else (1, num_crops)
        crop_w, crop_h = int(math.ceil(width / crops_w)), int(math.ceil(height / crops_h))
        if min(crop_w, crop_h) < self.min_crop_size:
            return []
        return [
            image[:, row * crop_h : (row + 1) * crop_h, col * crop_w : (col + 1) * crop_w]
            for row in range(crops_h)
            for col in range(crops_w)
        ]


@dataclass(frozen=True)
class SiglipImageProcessor:
    height: int | None  # None: do_resize off (the image must then already be one size)
    width: int | None
    resample: Image.Resampling
    normalization: Normalization
    image_seq_length: int
    pan_and_scan: PanAndScan | None = None  # Gemma 3's do_pan_and_scan; None: off
    is_gemma3: bool = False  # Gemma 3's processor also returns num_crops

    @classmethod
    def from_config(cls, preprocessor: Mapping, processor: Mapping, is_gemma3: bool) -> SiglipImageProcessor:
        """`image_seq_length` is in Gemma 3's and PaliGemma's processor_config.json (and preprocessor_config.json)."""
        height = width = None
        if setting(preprocessor, "do_resize", True):
            target = ResizeTarget.from_config(setting(preprocessor, "size", 224), default_to_square=is_gemma3)
            if target.shortest_edge is not None:
                raise FieldError("size", "size: SigLIP resizes to one fixed size; give {'height': H, 'width': W}")
            height, width = target.height, target.width
        pan_and_scan = None
        if is_gemma3 and setting(preprocessor, "do_pan_and_scan", False):
            defaults = PanAndScan()
            pan_and_scan = PanAndScan(
                min_crop_size=int(setting(preprocessor, "pan_and_scan_min_crop_size", defaults.min_crop_size)),
                max_num_crops=int(setting(preprocessor, "pan_and_scan_max_num_crops", defaults.max_num_crops)),
                min_ratio_to_activate=float(
                    setting(preprocessor, "pan_and_scan_min_ratio_to_activate", defaults.min_ratio_to_activate)
                ),
            )
        default_filter = Image.Resampling.BILINEAR if is_gemma3 else Image.Resampling.BICUBIC
        return cls(
            height=height,
            width=width,
            resample=resample_filter(preprocessor, default_filter),
            normalization=Normalization.from_config(preprocessor, HALF, HALF),
            image_seq_length=positive_int(
                processor, "image_seq_length", setting(preprocessor, "image_seq_length", 256 if is_gemma3 else None)
            ),
            pan_and_scan=pan_and_scan,
            is_gemma3=is_gemma3,
        )

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> ProcessedImages:
        pixels, num_crops = [], []
        for image in as_image_list(images):
            whole = to_rgb(image)
            crops = self.pan_and_scan.crops(whole) if self.pan_and_scan is not None else []
            pixels.extend(self._one(part) for part in [whole, *crops])
            num_crops.append(len(crops))
        return ProcessedImages(
            pixel_values=torch.from_numpy(np.stack(pixels)),  # images + crops, 3, H, W
            num_tokens=tuple((1 + n) * self.image_seq_length for n in num_crops),
            pixel_values_per_image=tuple(1 + n for n in num_crops),
            num_crops=tuple(num_crops) if self.is_gemma3 else None,
            placeholder_texts=tuple(self._gemma3_text(n) for n in num_crops) if self.is_gemma3 else None,
        )

    def _gemma3_text(self, num_crops: int) -> str:
        """What Gemma3Processor puts for an image's <start_of_image>: its soft tokens between <start_of_image> and
        <end_of_image>, blank lines around, and after it each crop's the same (its replace_image_token)."""
        picture = f"\n\n{GEMMA3_BOI}{GEMMA3_IMAGE * self.image_seq_length}{GEMMA3_EOI}\n\n"
        if not num_crops:
            return picture
        crops = " ".join([picture] * num_crops)
        return f"Here is the original image {picture} and here are some crops to help you see better {crops}"

    def _one(self, image: np.ndarray) -> np.ndarray:
        if self.height is not None and self.width is not None:
            image = resize(image, self.height, self.width, self.resample)
        return self.normalization.apply(image)
