"""Idefics3's preprocessing, which SmolVLM shares (HF's Idefics3ImageProcessor and SmolVLMImageProcessor): the
image's longest edge resized (Lanczos) to size's longest_edge, then up to multiples of max_image_size; when larger
than one tile it is cut into rows x cols tiles of max_image_size, and the whole image, resized to one tile, follows
them as the global image (a small image is only the global image, rows = cols = 0). Every tile is rescaled and
normalized to [-1, 1]. The prompt gets `image_seq_len` image tokens per tile and for the global image:
image_seq_len * (rows * cols + 1), which the processor wraps in <row_r_col_c> and <global-img> tags
(`placeholder_text`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sagellm.common.errors import FieldError
from sagellm.runtime.multimodal.pixel_steps import as_image_list, resize, to_rgb
from sagellm.runtime.multimodal.preprocessor_settings import HALF, Normalization, positive_int, resample_filter, setting
from sagellm.runtime.multimodal.processed_images import ProcessedImages

MAX_IMAGE_SIZE = 4096  # HF's cap on either side after the first resize
# The processor's tokens (Idefics3Processor's; SmolVLM's tokenizers name the same ones)
FAKE_TOKEN, IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN = "<fake_token_around_image>", "<image>", "<global-img>"


def placeholder_text(rows: int, cols: int, image_seq_len: int) -> str:
    """What an image's `<image>` becomes in the prompt, as Idefics3Processor.replace_image_token writes it: each
    tile's image tokens after its <row_r_col_c> tag, a line per row of tiles, then the global image's; the global
    image's alone for an image not split (rows = cols = 0)."""
    tiles = image_seq_len * IMAGE_TOKEN
    rows_text = "".join("".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{tiles}" for c in range(cols)) + "\n"
                        for r in range(rows))  # fmt: skip
    whole = f"{FAKE_TOKEN}{GLOBAL_IMAGE_TOKEN}{tiles}{FAKE_TOKEN}"
    return f"{rows_text}\n{whole}" if rows or cols else whole


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """(height, width) with the longest side at `longest_edge` (up or down), the other kept in ratio and rounded up
    to even, then scaled below MAX_IMAGE_SIZE, as HF's Idefics3 resize does."""
    aspect_ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect_ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect_ratio = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / aspect_ratio)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) rounded up to multiples of `tile`, the short side from the long side's ratio."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    return height, width


@dataclass(frozen=True)
class Idefics3ImageProcessor:
    longest_edge: int | None  # size's longest_edge; None: do_resize off
    tile: int  # max_image_size's longest_edge: a tile's side, and the global image's
    split: bool  # do_image_splitting
    resample: Image.Resampling
    normalization: Normalization
    pad: bool  # do_pad: HF then also returns pixel_attention_mask
    image_seq_len: int

    @classmethod
    def from_config(cls, preprocessor: Mapping, processor: Mapping) -> Idefics3ImageProcessor:
        """`image_seq_len` is in processor_config.json (169 for Idefics3, 64 for SmolVLM-256M/500M)."""
        longest_edge = None
        if setting(preprocessor, "do_resize", True):
            size = setting(preprocessor, "size", {"longest_edge": 4 * 364})
            if not isinstance(size, Mapping) or set(size) != {"longest_edge"}:
                raise FieldError("size", f"size: {size!r}; Idefics3 takes {{'longest_edge': N}}")
            longest_edge = positive_int(size, "longest_edge", None)
        max_image_size = setting(preprocessor, "max_image_size", {"longest_edge": 364})
        if not isinstance(max_image_size, Mapping):
            raise FieldError("max_image_size", f"max_image_size: {max_image_size!r}; give {{'longest_edge': N}}")
        return cls(
            longest_edge=longest_edge,
            tile=positive_int(max_image_size, "longest_edge", None),
            split=bool(setting(preprocessor, "do_image_splitting", True)),
            resample=resample_filter(preprocessor, Image.Resampling.LANCZOS),
            normalization=Normalization.from_config(preprocessor, HALF, HALF),
            pad=bool(setting(preprocessor, "do_pad", True)),
            image_seq_len=positive_int(processor, "image_seq_len", 169),
        )

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> ProcessedImages:
        tiles, rows, cols = [], [], []
        for image in as_image_list(images):
            image_tiles, image_rows, image_cols = self._tiles(to_rgb(image))
            tiles.extend(self.normalization.apply(tile) for tile in image_tiles)
            rows.append(image_rows)
            cols.append(image_cols)
        pixel_values = np.stack(tiles)[None]  # 1, tiles, 3, tile, tile: one prompt is one HF batch row
        mask = torch.ones(pixel_values.shape[:2] + pixel_values.shape[3:], dtype=torch.int64) if self.pad else None
        return ProcessedImages(
            pixel_values=torch.from_numpy(pixel_values),
            num_tokens=tuple(self.image_seq_len * (r * c + 1) for r, c in zip(rows, cols)),
            pixel_values_per_image=tuple(r * c + 1 for r, c in zip(rows, cols)),
            pixel_attention_mask=mask,  # every tile is tile x tile, so HF's padding never pads
            rows=tuple(rows),
            cols=tuple(cols),
            placeholder_texts=tuple(placeholder_text(r, c, self.image_seq_len) for r, c in zip(rows, cols)),
        )

    def _tiles(self, image: np.ndarray) -> tuple[list[np.ndarray], int, int]:
        """The tiles of a uint8 [3, H, W] then its global image, and the tile grid's rows and cols."""
        if self.longest_edge is not None:
            image = resize(image, *longest_edge_size(*image.shape[1:], self.longest_edge), self.resample)
        if not self.split:
            return [resize(image, self.tile, self.tile, self.resample)], 0, 0
        image = resize(image, *tile_multiple_size(*image.shape[1:], self.tile), self.resample)
        _, height, width = image.shape
        if height <= self.tile and width <= self.tile:
            return [image], 0, 0
        rows, cols = height // self.tile, width // self.tile
        tiles = [
            image[:, r * self.tile : (r + 1) * self.tile, c * self.tile : (c + 1) * self.tile]
            for r in range(rows)
            for c in range(cols)
        ]
        return [*tiles, resize(image, self.tile, self.tile, self.resample)], rows, cols
