"""Pooling: one vector per input from an encoder's per-token states, ignoring padding, the way
sentence-transformers' Pooling module does it (so the vectors match what the model was trained to produce)."""

from __future__ import annotations

import torch

from sagellm.runtime.embedding.spec import PoolingMode


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[PoolingMode, ...]) -> torch.Tensor:
    """`hidden` [B, T, H] token states, `mask` [B, T] 1 for real tokens (inputs right-padded) -> [B, H * len(modes)],
    the modes' vectors concatenated in the given order."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    lengths = weights.sum(dim=1).clamp(min=1.0)  # [B, 1]
    vectors = []
    for mode in modes:
        if mode == "cls":
            vectors.append(hidden[:, 0])  # [B, H]
        elif mode == "max":
            vectors.append(hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).amax(dim=1))  # [B, H]
        elif mode == "mean":
            vectors.append((hidden * weights).sum(dim=1) / lengths)  # [B, H]
        else:  # mean_sqrt_len_tokens
            vectors.append((hidden * weights).sum(dim=1) / lengths.sqrt())  # [B, H]
    return torch.cat(vectors, dim=-1)  # [B, H * len(modes)]
