"""The torch ops a vision encoder adds to the decoder's: LayerNorm with a bias, the erf GELU and CLIP's quick GELU,
dense bidirectional attention within each image (`EncoderMetadata` says where each image's rows are), the
embeddings (pixels cut into patches, CLIP's class row, the learned positions: `grid_position_ids` for Idefics3's
tower, which numbers them by fractional coordinates), Idefics3's pixel shuffle and Gemma 3's pooling.

An encoder step stacks its images' rows, [T, D] with T = sum of each image's rows, as a decoder step stacks its
tokens, so every op but attention is the decoder's row-wise kind; attention reads each image's rows alone. What the
kernel-table ones take and return is their kernel_contracts.py protocol's."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EncoderMetadata:
    """An encoder step's images in its rows: image i is the `seq_lens[i]` rows after those of the images before it
    (its patches, and its class row first where the tower has one)."""

    seq_lens: tuple[int, ...]


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, weight.shape, weight, bias, eps)  # [T, D]


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # [T, N], the exact (erf) GELU


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's approximation, x * sigmoid(1.702 x), as transformers computes it."""
    return x * torch.sigmoid(1.702 * x)  # [T, N]


def encoder_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: EncoderMetadata, scale: float
) -> torch.Tensor:
    """Each image's rows attend to all of its own rows (no mask, no cache): q, k, v [T, H, D] -> [T, H, D]. Images
    of one size in a row go as one batch."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D]
    start = 0
    for length, same in itertools.groupby(meta.seq_lens):
        rows = slice(start, start + len(list(same)) * length)
        q_, k_, v_ = (x[rows].unflatten(0, (-1, length)).transpose(1, 2) for x in (q, k, v))  # [n, H, S, D]
        attended = F.scaled_dot_product_attention(q_, k_, v_, scale=scale)  # [n, H, S, D]
        out[rows] = attended.transpose(1, 2).flatten(0, 1)  # [n * S, H, D]
        start = rows.stop
    return out


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images [N, C, H, W] -> their patches [N * gh * gw, C * p * p], row by row, each flattened in (C, ph, pw)
    order: a patch embedding's convolution [D, C, p, p] is then a linear on [D, C * p * p]."""
    n, c, h, w = pixel_values.shape
    p = patch_size
    grid = pixel_values.reshape(n, c, h // p, p, w // p, p)  # [N, C, gh, p, gw, p]
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(n * (h // p) * (w // p), c * p * p)


def class_and_positions(patches: torch.Tensor, class_row: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """Embedded patches [N * P, D] -> each image's rows [P (+ 1), D], its class row [D] first when given, plus the
    learned position rows [P (+ 1), D]: [N * (P (+ 1)), D]."""
    rows, d = positions.shape
    images = patches.view(-1, rows - (class_row is not None), d)  # [N, P, D]
    if class_row is not None:
        images = torch.cat([class_row.expand(images.shape[0], 1, d), images], dim=1)  # [N, P + 1, D]
    return (images + positions).view(-1, d)


def drop_class_rows(x: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
    """Each image's rows but its first (the class row): [T, D] -> [T - N, D]."""
    return torch.cat([image[1:] for image in x.split(list(meta.seq_lens))])


def grid_position_ids(grid: int) -> torch.Tensor:
    """The position ids Idefics3's embeddings give a whole picture of grid x grid patches, computed as its
    Idefics3VisionEmbeddings does (each patch's fractional coordinates bucketized against the grid's boundaries, in
    float32), so an id its rounding moves is moved here too: [grid * grid] int64."""
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    step = 1.0 / torch.tensor(grid)  # float32, as HF's 1.0 / nb_patches
    fractional = (torch.arange(grid, dtype=torch.float32) * step).clamp(max=1.0 - 1e-6)
    bucket = torch.bucketize(fractional, boundaries, right=True)  # [grid]
    return (bucket[:, None] * grid + bucket[None, :]).flatten()


def pixel_shuffle(x: torch.Tensor, grid: int, scale: int) -> torch.Tensor:
    """Idefics3Connector.pixel_shuffle on each picture's grid x grid rows: every scale x scale square of patches
    joined along features, [N * grid^2, D] -> [N * grid^2 / scale^2, D * scale^2]."""
    d, side = x.shape[1], grid // scale
    x = x.view(-1, grid, side, d * scale).permute(0, 2, 1, 3)  # [N, grid / s, grid, D * s]
    x = x.reshape(-1, side, side, d * scale * scale).permute(0, 2, 1, 3)  # [N, grid / s, grid / s, D * s^2]
    return x.reshape(-1, d * scale * scale)


def pool_squares(x: torch.Tensor, grid: int, side: int) -> torch.Tensor:
    """Gemma 3's soft tokens: each picture's grid x grid rows averaged over squares into side x side rows, row-major
    (its projector's AvgPool2d over the patch grid), [N * grid^2, D] -> [N * side^2, D]."""
    d = x.shape[1]
    planes = x.view(-1, grid, grid, d).permute(0, 3, 1, 2)  # [N, D, grid, grid]
    pooled = F.avg_pool2d(planes, kernel_size=grid // side)  # [N, D, side, side]
    return pooled.flatten(2).transpose(1, 2).reshape(-1, d)
