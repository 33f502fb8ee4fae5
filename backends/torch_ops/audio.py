"""The torch ops an audio encoder (Whisper's, as Qwen2-Audio runs it) adds to the vision encoder's: its two
convolutions over a clip's log-mel frames, its rows cut to the clip's own and given their learned positions, and
its rows averaged in pairs.

A clip's frames come as rows, [F, mel], as a decoder step's tokens do, so the convolutions run along the rows and
every other op is row-wise or attention over the clip's rows (vision.encoder_attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sagellm.backends.torch_ops.vision import EncoderMetadata


def conv1d_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    """A 1-D convolution along the rows, zero-padded by half the kernel on each side as Whisper's: x [F, C_in],
    weight [C_out, C_in, k] -> [(F + 2 * (k // 2) - k) // stride + 1, C_out]."""
    out = F.conv1d(x.t()[None], weight, bias, stride=stride, padding=weight.shape[-1] // 2)  # [1, C_out, F']
    return out[0].t().contiguous()


def positioned_rows(x: torch.Tensor, meta: EncoderMetadata, positions: torch.Tensor) -> torch.Tensor:
    """The clip's own rows of the convolutions' output (those past it read only the padding's frames, and the
    encoder's attention never reads them) plus their learned positions: x [R, D] -> [rows, D]."""
    (rows,) = meta.seq_lens
    return x[:rows] + positions[:rows]


def pool_row_pairs(x: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
    """Each two rows of the clip averaged into one (AvgPool1d(2, 2)), an odd last row dropped: [R, D] ->
    [R // 2, D]."""
    (rows,) = meta.seq_lens
    return x[: rows - rows % 2].view(rows // 2, 2, -1).mean(dim=1)
