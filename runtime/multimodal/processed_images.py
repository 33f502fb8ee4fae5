"""What preprocessing one prompt's images gives the model: the pixel values in the layout the Hugging Face processor
returns for the same images, each family's extras, and per image the number of placeholder tokens the HF processor
puts into the prompt for it (the tokens whose embeddings the vision encoder's output replaces)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image


@dataclass(frozen=True)
class ProcessedImages:
    """One prompt's images, in prompt order.

    `pixel_values` is float32 in HF's layout: [N, 3, H, W] for CLIP and SigLIP (N = images, plus Gemma 3's crops);
    [patches, 3 * temporal_patch_size * P * P] for Qwen-VL; [1, tiles, 3, H, W] for Idefics3 / SmolVLM;
    [N, max_patches, 3 * P * P] for Gemma 4.
    `pixel_values_per_image[i]` is how many of those images, crops, patches or tiles image i holds, so a caller
    can cut the batch per image (for an encoder cache keyed on the image) without knowing the family."""

    pixel_values: torch.Tensor
    num_tokens: tuple[int, ...]  # placeholder tokens the HF processor puts into the prompt per image
    pixel_values_per_image: tuple[int, ...]
    image_grid_thw: torch.Tensor | None = None  # Qwen-VL: int64 [images, 3], (t, h, w) in patches
    pixel_attention_mask: torch.Tensor | None = None  # Idefics3: int64 [1, tiles, H, W], 1 on real pixels
    rows: tuple[int, ...] | None = None  # Idefics3: the tile grid per image; 0 and 0 when it was not split
    cols: tuple[int, ...] | None = None
    num_crops: tuple[int, ...] | None = None  # Gemma 3: pan-and-scan crops per image, after the image itself
    # Where an image's placeholder becomes more than its image tokens repeated, the text that replaces it (HF's
    # processor's replace_image_token: Idefics3's tiles, each tagged, then the whole image): one per image
    placeholder_texts: tuple[str, ...] | None = None
    # Gemma 4: pixel_values are [images, max_patches, 3 * P * P], each image's patches padded; these their (x, y)
    # int64 [images, max_patches, 2] (-1 on padding), as its image processor returns them
    image_position_ids: torch.Tensor | None = None
    # Where the encoder reads each picture other than as pixel_values' [C, H, W] (Gemma 4: its own patches and their
    # positions, gemma4_vision.patch_rows): one per picture, in order
    encoder_inputs: tuple[torch.Tensor, ...] | None = None
    # Qwen-VL: the (t, h, w) grid of each picture's placeholder tokens (image_grid_thw with h and w divided by
    # merge_size), which its MediaFeature carries for the encoder and the text model's multimodal rotary positions
    token_grids: tuple[tuple[int, int, int], ...] | None = None


class ImageProcessor(Protocol):
    """A family's preprocessing, configured from a checkpoint's preprocessor_config.json."""

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> ProcessedImages:
        """One prompt's images (any PIL mode and size) as the model takes them."""
        ...
