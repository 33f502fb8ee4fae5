"""Qwen-VL's multimodal rotary embedding (M-RoPE) on the rope kernels' one table.

A token has three positions, time, height and width, and each rotary frequency turns by one of them
(`ModelConfig.mrope_section`): a text token's three are equal, so it reads the plain table's row at its position, as
any model's token does; a picture's token's are not, and its row is composed, each column taken from the plain
table's row at the position that column's frequency turns by. Those rows sit past the table's positions, one per
picture token of a step, written before the step runs (`StepRopeRows`); the token's position is the row it reads.
The kernels (plain, fused and on every backend) need nothing new: they read the row a position names."""

from __future__ import annotations

import torch

from sagellm.runtime.models.config import ModelConfig


def frequency_positions(config: ModelConfig) -> torch.Tensor:
    """Which of a token's positions (0: time, 1: height, 2: width) each rotary frequency turns by, [rotary_dims / 2]:
    `mrope_section[i]` frequencies each, in turn (Qwen2-VL's `mrope_section * 2` split), or interleaved t h w t h w
    ... while each lasts, the rest time (Qwen3-VL's and Qwen3.5's `apply_interleaved_mrope`)."""
    t, h, w = config.mrope_section
    if not config.mrope_interleaved:
        return torch.tensor([0] * t + [1] * h + [2] * w)
    which = torch.zeros(config.rotary_dims // 2, dtype=torch.int64)
    which[1 : 3 * h : 3] = 1
    which[2 : 3 * w : 3] = 2
    return which


class StepRopeRows:
    """The rows past a rope table's `positions` that a step's picture tokens read: `capacity` of them (the most
    tokens a step runs), composed from the table's own rows (the table is [positions + capacity, rotary dims], cos
    then sin, as rope.cos_sin_table makes it)."""

    def __init__(self, config: ModelConfig, table: torch.Tensor, positions: int) -> None:
        self.table, self.first = table, positions
        self.capacity = table.shape[0] - positions
        columns = frequency_positions(config).repeat(2)  # the cos half's frequencies, then the sin half's
        self._columns = columns.to(table.device)
        self._column_index = torch.arange(len(columns), device=table.device)

    def write(self, positions: torch.Tensor) -> None:
        """Rows first, first + 1, ... for the picture tokens whose (time, height, width) positions are
        `positions` [3, n] (int64, on the table's device), in order."""
        n = positions.shape[1]
        if n > self.capacity:
            raise ValueError(f"a step with {n} picture tokens: the rope table holds rows for {self.capacity}")
        rows = positions[self._columns].T  # [n, R]: the position each of a token's columns turns by
        self.table[self.first : self.first + n] = self.table[rows, self._column_index]
