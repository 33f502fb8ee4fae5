"""The torch ops Gemma 4's vision tower adds to the other encoders' (vision.py): pictures arrive as rows of patches,
each row its patch's pixels then its (x, y) position in the picture's patch grid (`patch_rows`), several pictures of
different shapes stacked as a decoder step stacks tokens (`EncoderMetadata.seq_lens`: each one's patches).

Each op is transformers' Gemma4VisionModel on one picture without its padding: the patch embedder (a linear on
2 * (pixels - 0.5) plus a learned row per x and per y), the 2-D rope (the first half of each head turned by x, the
second by y), the pooler (each k x k square of patches averaged, row-major, scaled by sqrt(hidden)) and the clamps of
its clipped linears. A padded patch of transformers' batch is masked out of its attention and pooling, so reading each
picture's own patches alone gives its result."""

from __future__ import annotations

import torch

from sagellm.backends.torch_ops.vision import EncoderMetadata

POSITION_COLUMNS = 2  # a patch row's last two values: its x and y in the picture's patch grid


def patch_rows(patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A picture's encoder input: its patches [P, C * p * p] (Gemma4ImageProcessor's layout) and their (x, y)
    positions [P, 2] side by side, float32 [P, C * p * p + 2] (positions are small integers, exact in float32)."""
    return torch.cat([patches.float(), positions.float()], dim=1)


def patch_positions(rows: torch.Tensor) -> torch.Tensor:
    """The (x, y) of each patch row: [T, K] -> int64 [T, 2]."""
    return rows[:, -POSITION_COLUMNS:].round().long()


def patch_embed(
    rows: torch.Tensor, linear, weight: object, table: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Gemma4VisionPatchEmbedder: `linear` (the backend's, with its packed `weight`) on the pixels mapped to [-1, 1],
    plus the x table's row of each patch's x and the y table's of its y (`table` [2, size, D]): [T, K] -> [T, D]."""
    pixels = 2 * (rows[:, :-POSITION_COLUMNS] - 0.5)
    return linear(pixels, weight) + table[0][positions[:, 0]] + table[1][positions[:, 1]]


def axial_rope(x: torch.Tensor, positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Gemma4VisionRotaryEmbedding and apply_multidimensional_rope on x [T, H * D]: each head's first D / 2 channels
    rotated (rotate-half) by the patch's x, its last D / 2 by its y, at frequencies theta^(-2i / (D / 2))."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=x.device) / half))  # [D / 4]
    heads = x.view(x.shape[0], -1, head_dim)  # [T, H, D]
    parts = []
    for axis, part in enumerate(heads.split(half, dim=-1)):  # [T, H, D / 2] each
        freqs = positions[:, axis, None].float() * inv_freq  # [T, D / 4]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [T, 1, D / 2]
        first, second = part.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
        parts.append(part * angles.cos() + rotated * angles.sin())
    return torch.cat(parts, dim=-1).reshape(x.shape)


def pool_by_positions(
    x: torch.Tensor, positions: torch.Tensor, meta: EncoderMetadata, kernel: int, scale: float
) -> torch.Tensor:
    """Gemma4VisionPooler on each picture: the patches of each kernel x kernel square averaged into one row, the
    squares in row-major order, then scaled by `scale` (sqrt of the tower's width): [T, D] -> [T / kernel^2, D]."""
    out = []
    start = 0
    for length in meta.seq_lens:
        rows, where = x[start : start + length], positions[start : start + length]
        start += length
        columns = int(where[:, 0].max()) + 1
        square = (where[:, 0] // kernel) + (columns // kernel) * (where[:, 1] // kernel)  # [P]
        pooled = torch.zeros(length // kernel**2, x.shape[1], dtype=torch.float32, device=x.device)
        pooled.index_add_(0, square, rows.float() / kernel**2)
        out.append(pooled)
    return torch.cat(out) * scale


def clamp(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Gemma4ClippableLinear's clamp of a linear's input or output to its stored bounds (scalars)."""
    return torch.clamp(x, low, high)


def standardize(x: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Gemma4VisionModel's standardization of the pooled rows: (x - bias) * scale, per channel."""
    return (x - bias) * scale
