"""A linear whose weights LoRA adapters change: the base matmul once for the whole step, then each row's adapter
update of each adapted weight (its own columns of a fused q/k/v or gate/up output), through the backend's `add_lora`
(runtime/engine/lora_weights.LoraWeights holds a rank's adapters and the step's rows' slots). Fusing decoder layers
reads its `parts` so the backend's one call adds the same updates (backends/decoder_layer.py LoraPart)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sagellm.backends.decoder_layer import LoraPart


class LoraLinear:
    def __init__(self, linear: Callable[..., torch.Tensor], lora: Any, columns: list[tuple[str, int, int]]) -> None:
        """`columns`: (weight name, begin, end) of each adapted weight's output columns; `lora`: the rank's
        LoraWeights."""
        self.linear, self.lora, self.columns = linear, lora, columns

    def __call__(self, x: torch.Tensor, *consts: Any) -> torch.Tensor:
        out = self.linear(x, *consts)
        if self.lora.row_slots is not None:
            for name, begin, end in self.columns:
                whole = begin == 0 and end == out.shape[1]
                self.lora.add(out if whole else out[:, begin:end], x, name)
        return out

    @property
    def parts(self) -> tuple[LoraPart, ...]:
        """The adapted weights' stacked slots and columns, as a fused kernel adds them."""
        return tuple(LoraPart(self.lora.a[name], self.lora.b_t[name], begin, end) for name, begin, end in self.columns)
