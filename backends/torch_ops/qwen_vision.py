"""The torch ops Qwen-VL's vision towers (Qwen3.5's, Qwen2.5-VL's) add to the other encoders' (vision.py): pictures
arrive as rows of patches in their processor's order (each merge x merge square of neighbouring patches contiguous,
the squares row-major), each row a patch's temporal_patch_size frames of pixels, several pictures stacked as a
decoder step stacks tokens; what the rows cannot say, each picture's grid, rides in the step's metadata
(`GridMetadata`).

Each op is transformers' Qwen3_5VisionModel or Qwen2_5_VisionTransformerPretrainedModel on the step's pictures,
computed as it computes them (vision_utils' get_vision_position_ids, get_vision_interpolation_indices_and_weights and
get_vision_window_index, Qwen3_5VisionRotaryEmbedding, apply_rotary_pos_emb_vision), so its results are
transformers' to float rounding. Qwen2.5-VL's window attention reorders the rows so that each window's merged squares
are contiguous (`window_order`), attends within each window (`window_metadata`'s lengths) or each frame, and puts
the merged rows back in the processor's order (`window_restore`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sagellm.backends.torch_ops.vision import EncoderMetadata

Grid = tuple[int, int, int]  # (t, h, w): a picture's frames, and its patches down and across


@dataclass(frozen=True)
class GridMetadata(EncoderMetadata):
    """An encoder step's pictures: `grids`, each one's (t, h, w) in patches, in row order; `seq_lens` (what
    attention reads) each frame's h * w patches, as transformers' cu_seqlens attend within a frame."""

    grids: tuple[Grid, ...] = ()

    @classmethod
    def of(cls, grids: Sequence[Grid]) -> GridMetadata:
        grids = tuple((int(t), int(h), int(w)) for t, h, w in grids)
        return cls(tuple(h * w for t, h, w in grids for _ in range(t)), grids)


@functools.lru_cache(maxsize=256)
def _block_positions(grid: Grid, merge: int) -> torch.Tensor:
    """get_vision_position_ids of one picture: each patch's (row, column), patches in merge-square order, repeated
    for each frame: int64 [t * h * w, 2]."""
    t, h, w = grid
    rows = torch.arange(h).view(h // merge, 1, merge, 1).expand(h // merge, w // merge, merge, merge)
    columns = torch.arange(w).view(1, w // merge, 1, merge).expand(h // merge, w // merge, merge, merge)
    return torch.stack([rows.flatten(), columns.flatten()], dim=-1).repeat(t, 1)


def block_positions(meta: GridMetadata, merge: int, device: torch.device) -> torch.Tensor:
    """Every row's (row, column) in its picture's patch grid: int64 [T, 2]."""
    return torch.cat([_block_positions(grid, merge) for grid in meta.grids]).to(device)


def _axis_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps (align_corners) along one axis of `size` patches into `side` learned rows, and their weights:
    [N, 2] each."""
    source = index.float() * (side - 1) / max(size - 1, 1)
    floor = torch.floor(source)
    offsets = torch.arange(0, 2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (source[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


@functools.lru_cache(maxsize=256)
def _interpolation(grid: Grid, merge: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One picture's rows of the side x side table each patch reads, and their weights: [t * h * w, 4] each."""
    _, h, w = grid
    where = _block_positions(grid, merge)
    row_taps, row_weights = _axis_taps(where[:, 0], h, side)
    column_taps, column_weights = _axis_taps(where[:, 1], w, side)
    indices = (row_taps[:, :, None] * side + column_taps[:, None, :]).reshape(-1, 4)
    weights = (row_weights[:, :, None] * column_weights[:, None, :]).reshape(-1, 4)
    return indices, weights


def add_grid_positions(x: torch.Tensor, meta: GridMetadata, table: torch.Tensor, merge: int) -> torch.Tensor:
    """x [T, D] plus each patch's learned position: the square table [side^2, D] resampled bilinearly (corners
    aligned) to its picture's grid, as F.interpolate would."""
    side = int(table.shape[0] ** 0.5)
    parts = [_interpolation(grid, merge, side) for grid in meta.grids]
    indices = torch.cat([i for i, _ in parts]).to(x.device)  # [T, 4]
    weights = torch.cat([w for _, w in parts]).to(x.device)  # [T, 4]
    return x + (table[indices] * weights[:, :, None]).sum(1).to(x.dtype)


def grid_rope(
    x: torch.Tensor, meta: GridMetadata, head_dim: int, theta: float, merge: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3_5VisionRotaryEmbedding's cos and sin [T, head_dim] of every row: frequencies theta^(-2i / (D / 2)) of
    the patch's row for the first D / 4 channels, of its column for the next D / 4, and the same again."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)).to(x.device)  # [D / 4]
    freqs = block_positions(meta, merge, x.device)[..., None].float() * inv_freq  # [T, 2, D / 4]
    angles = freqs.flatten(1)  # [T, D / 2]: the row's, then the column's
    angles = torch.cat([angles, angles], dim=-1)  # [T, D]
    return angles.cos(), angles.sin()


def rotate_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """apply_rotary_pos_emb_vision on x [T, H * D]: each head turned rotate-half by its row's angles."""
    heads = x.view(x.shape[0], -1, head_dim).float()  # [T, H, D]
    first, second = heads.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    out = heads * cos[:, None, :] + rotated * sin[:, None, :]
    return out.to(x.dtype).reshape(x.shape)


def join_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """Each `group` consecutive rows side by side (the merger's view(-1, D * merge^2)): [T, D] -> [T / g, g * D]."""
    return x.reshape(-1, x.shape[1] * group)


@functools.lru_cache(maxsize=256)
def _windows(grid: Grid, merge: int, side: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """get_vision_window_index of one picture: its merged squares in window order (each frame's windows of side x
    side squares row-major, the squares in each row-major), int64 [t * h * w / merge^2]; and each window's rows
    (patches). The windows at the right and bottom edges hold what is left of the picture."""
    t, h, w = grid
    down, across = h // merge, w // merge  # the picture's squares
    rows, columns = -(-down // side), -(-across // side)  # its windows
    squares = torch.arange(t * down * across).view(t, down, across)
    padded = F.pad(squares, (0, columns * side - across, 0, rows * side - down), value=-1)
    windows = padded.view(t, rows, side, columns, side).transpose(2, 3).reshape(t * rows * columns, side * side)
    return windows[windows >= 0], tuple(((windows >= 0).sum(1) * merge * merge).tolist())


@functools.lru_cache(maxsize=256)
def _window_order(meta: GridMetadata, merge: int, side: int) -> torch.Tensor:
    """Every picture's merged squares in window order, numbered across the step: int64 [T / merge^2]."""
    orders, first = [], 0
    for grid in meta.grids:
        order, _ = _windows(grid, merge, side)
        orders.append(order + first)
        first += order.shape[0]
    return torch.cat(orders)


def window_metadata(meta: GridMetadata, merge: int, side: int) -> EncoderMetadata:
    """What a windowed layer's attention reads: each window's rows, in window order (`window_order`'s)."""
    return EncoderMetadata(tuple(n for grid in meta.grids for n in _windows(grid, merge, side)[1]))


def window_order(x: torch.Tensor, meta: GridMetadata, merge: int, side: int) -> torch.Tensor:
    """x [T, D] in the processor's order -> in window order, each merged square's merge^2 rows kept together
    (permute_input_for_window_attn): [T, D]."""
    order = _window_order(meta, merge, side).to(x.device)
    return x.view(order.shape[0], -1)[order].view(x.shape)  # [T / merge^2, merge^2 * D] gathered


def window_restore(x: torch.Tensor, meta: GridMetadata, merge: int, side: int) -> torch.Tensor:
    """The merger's rows x [T / merge^2, D], one per merged square in window order -> in the processor's order."""
    order = _window_order(meta, merge, side).to(x.device)
    return torch.empty_like(x).index_copy_(0, order, x)
