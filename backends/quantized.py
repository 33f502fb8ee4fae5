"""A linear weight as the GGUF file stored it: llama.cpp's quantized blocks, kept beside the dequantized fp32 copy
so a backend whose kernels read blocks can stream a quarter of the bytes at decode.

The loader keeps the kinds some backend reads (`KEPT_KINDS`); every backend still gets the dense weight and may
ignore this. Blocks hold 32 inputs of one output row, so rows stay independent: fusing linears (q, k, v) is a
concatenation of rows, and llama.cpp's q/k row permutation is undone on blocks exactly as on dense rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK_INPUTS = 32  # inputs per block in every kept kind
# Bytes per block of the kept kinds (GGML type names): fp16 d [, fp16 m], then the packed values.
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
KEPT_KINDS = tuple(BLOCK_BYTES)  # what backends/native/block_layout.py packs


@dataclass(frozen=True)
class QuantizedWeight:
    kind: str  # GGML type name, one of KEPT_KINDS
    blocks: torch.Tensor  # uint8 [out_features, in_features / 32 * block bytes], GGML blocks row after row
    in_features: int

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    @staticmethod
    def concat(parts: Sequence[QuantizedWeight | None]) -> QuantizedWeight | None:
        """The rows of `parts` stacked (a fused linear), or None unless all are present, of one kind and width."""
        kept = [p for p in parts if p is not None]
        if not kept or len(kept) < len(parts):
            return None
        first = kept[0]
        if any((p.kind, p.in_features) != (first.kind, first.in_features) for p in kept):
            return None
        if len(kept) == 1:
            return first
        return QuantizedWeight(first.kind, torch.cat([p.blocks for p in kept]), first.in_features)

    def narrow(self, dim: int, start: int, stop: int) -> QuantizedWeight | None:
        """Rows [start, stop) (dim 0), or inputs [start, stop) (dim 1) when they fall on block bounds; else None
        (a tensor parallel rank's slice that cuts blocks reads the dense copy)."""
        if dim == 0:
            return QuantizedWeight(self.kind, self.blocks[start:stop], self.in_features)
        if start % BLOCK_INPUTS or stop % BLOCK_INPUTS:
            return None
        size = BLOCK_BYTES[self.kind]
        blocks = self.blocks[:, start // BLOCK_INPUTS * size : stop // BLOCK_INPUTS * size].contiguous()
        return QuantizedWeight(self.kind, blocks, stop - start)
