"""MXFP4 weights as Hugging Face's gpt-oss checkpoints pack them, repacked into llama.cpp's block_mxfp4 (GGUF type
MXFP4) so every loader hands the backends one format: the same 4-bit codes and exponents moved, never rounded.

Both formats hold, per 32 inputs of an output row, one E8M0 exponent byte e and 32 E2M1 codes (bit 3 the sign,
bits 0-2 an index into 0, 0.5, 1, 1.5, 2, 3, 4, 6). Hugging Face (transformers' integrations/mxfp4.py,
convert_moe_packed_tensors) keeps them apart: `*_blocks` uint8 [..., out, in / 32, 16], byte j holding input 2j in
its low nibble and 2j + 1 in its high one, and `*_scales` uint8 [..., out, in / 32]; a weight is FP4[code] *
2^(e - 127). ggml's block (e, qs[16]) puts input j in qs[j]'s low nibble and j + 16 in its high one and reads a
code as the doubled value (int8 kvalues_mxfp4) times 2^(e - 128): the same float. transformers returns the experts
transposed, [E, in, out]; these are [out, in] like every linear weight here."""

from __future__ import annotations

import torch

from sagellm.backends.quantized import BLOCK_BYTES, QuantizedWeight
from sagellm.common.errors import InvalidInput

CODES_PER_BLOCK = 16  # bytes of 4-bit codes per 32 inputs


class Mxfp4LayoutError(InvalidInput):
    """Blocks and scales that are not one MXFP4 tensor: the message names the shapes or dtypes that disagree."""


def ggml_blocks_from_hf(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Hugging Face's blocks uint8 [..., out, in / 32, 16] and scales uint8 [..., out, in / 32] as GGML MXFP4 rows,
    uint8 [..., out, in / 32 * 17]: per block the exponent, then the codes in ggml's order."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise Mxfp4LayoutError(f"MXFP4 blocks and scales are uint8, not {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 3 or blocks.shape[-1] != CODES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise Mxfp4LayoutError(
            f"MXFP4 blocks [..., out, in / 32, 16] and scales [..., out, in / 32] do not fit: "
            f"{tuple(blocks.shape)} and {tuple(scales.shape)}"
        )
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # [..., out, B, 32]: input order
    qs = codes[..., :16] | (codes[..., 16:] << 4)  # [..., out, B, 16]: input j low, j + 16 high
    ggml = torch.cat([scales.unsqueeze(-1), qs], dim=-1)  # [..., out, B, 17]
    return ggml.flatten(-2)  # [..., out, B * 17]


def weight_from_hf(blocks: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    """One [out, in] matrix from Hugging Face's blocks [out, in / 32, 16] and scales [out, in / 32]."""
    if blocks.dim() != 3:
        raise Mxfp4LayoutError(f"one MXFP4 matrix's blocks are [out, in / 32, 16], not {tuple(blocks.shape)}")
    rows = ggml_blocks_from_hf(blocks, scales)  # [out, B * 17]
    return QuantizedWeight("MXFP4", rows, rows.shape[1] // BLOCK_BYTES["MXFP4"] * 32)


def experts_from_hf(blocks: torch.Tensor, scales: torch.Tensor) -> list[QuantizedWeight]:
    """Each expert's [out, in] matrix from Hugging Face's stacked blocks [E, out, in / 32, 16] and scales
    [E, out, in / 32] (gpt-oss's `gate_up_proj_blocks`, `down_proj_blocks`): one repacking of the whole tensor,
    each expert a view of it."""
    if blocks.dim() != 4:
        raise Mxfp4LayoutError(f"stacked experts' MXFP4 blocks are [E, out, in / 32, 16], not {tuple(blocks.shape)}")
    rows = ggml_blocks_from_hf(blocks, scales)  # [E, out, B * 17]
    in_features = rows.shape[2] // BLOCK_BYTES["MXFP4"] * 32
    return [QuantizedWeight("MXFP4", expert, in_features) for expert in rows]
