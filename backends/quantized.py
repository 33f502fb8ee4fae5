"""A weight as the GGUF file stored it: llama.cpp's quantized blocks, which a backend whose kernels read blocks keeps
instead of the weight's floats (a fraction of the bytes in memory and per step), and from which an embedding reads
the rows a step's tokens select.

The loader keeps the kinds some backend reads (`KEPT_KINDS`); a backend that reads none asks the loader for the
dequantized floats instead. A block holds BLOCK_INPUTS[kind] inputs of one output row (32, or 256 for the
K-quants), so rows stay independent: fusing linears (q, k, v) is a concatenation of rows, and llama.cpp's q/k row
permutation is undone on blocks exactly as on dense rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gguf
import torch

# Inputs per block of each kept kind (GGML type names): 32 for the simple kinds and MXFP4, 256 for a K-quant's
# super-block.
BLOCK_INPUTS = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "MXFP4": 32}
# Bytes per block: the scales (fp16; MXFP4's one E8M0 exponent byte), then the packed values (ggml-common.h's
# block_* structs; gguf's GGML_QUANT_SIZES).
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "MXFP4": 17}
KEPT_KINDS = tuple(BLOCK_BYTES)  # what backends/native/block_layout.py packs


@dataclass(frozen=True)
class QuantizedWeight:
    kind: str  # GGML type name, one of KEPT_KINDS
    blocks: torch.Tensor  # uint8 [out_features, in_features / BLOCK_INPUTS * BLOCK_BYTES], GGML blocks row by row
    in_features: int

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [T] dequantized, [T, in_features] fp32: gguf-py's values (an embedding lookup)."""
        picked = self.blocks.index_select(0, ids.to("cpu")).numpy()  # [T, row bytes]
        kind = gguf.GGMLQuantizationType[self.kind]
        return torch.from_numpy(gguf.quants.dequantize(picked, kind).reshape(len(ids), self.in_features))

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
        """Rows [start, stop) (dim 0), or inputs [start, stop) (dim 1) when both fall on the kind's block bounds
        (every 256 inputs for a K-quant); else None: a tensor parallel rank's slice that cuts blocks has no blocks
        of its own and reads the dense copy."""
        if dim == 0:
            return QuantizedWeight(self.kind, self.blocks[start:stop], self.in_features)
        if dim != 1:
            raise ValueError(f"a linear weight has dims 0 (outputs) and 1 (inputs), not {dim}")
        inputs, size = BLOCK_INPUTS[self.kind], BLOCK_BYTES[self.kind]
        if start % inputs or stop % inputs:
            return None
        blocks = self.blocks[:, start // inputs * size : stop // inputs * size].contiguous()
        return QuantizedWeight(self.kind, blocks, stop - start)
