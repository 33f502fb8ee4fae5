"""Gemma 3n's alternating updates (AltUp) and activation sparsity, as torch ops on any device.

AltUp widens the residual stream into K streams ([T, K, H], K = 4) of which a layer computes on one (the active
stream): before the layer each stream is predicted as a per-token mix of all of them, after it the layer's output
corrects each prediction by its innovation, both mixes chosen per token by a small router (`modalities`). The
streams start as the embedding and K-1 projections of it matched to its magnitude, and end as the mean of the first
and K-1 projections back, matched again. All arithmetic follows transformers' Gemma3nTextAltUp."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def embed_streams(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """[T, H] -> [T, K, H]: x, then each projection [H, H] of it scaled to x's root mean square."""
    return torch.stack([x, *(_matched(F.linear(x, w), _rms(x)) for w in projections)], dim=1)


def unembed_streams(streams: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """[T, K, H] -> [T, H]: the mean of the first stream and each other one's projection back, scaled to the first's
    root mean square."""
    first = streams[:, 0]
    target = _rms(first)
    back = [_matched(F.linear(streams[:, k + 1], w), target) for k, w in enumerate(projections)]
    return torch.stack([first, *back]).mean(dim=0)


def predict(
    streams: torch.Tensor, norm: torch.Tensor, router: torch.Tensor, coefs: torch.Tensor, active: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each stream predicted as itself plus a per-token mix of all streams (coefs [K*K, K] over the router's
    modalities of the active stream); returns the predictions [T, K, H] and the active one's [T, H]."""
    k = streams.shape[1]
    mix = F.linear(modalities(streams[:, active], norm, router, eps), coefs).view(-1, k, k)  # [T, K, K]
    predictions = torch.matmul(streams.transpose(1, 2), mix.transpose(1, 2)).transpose(1, 2) + streams  # [T, K, H]
    return predictions, predictions[:, active]


def correct(
    predictions: torch.Tensor,
    activated: torch.Tensor,
    norm: torch.Tensor,
    router: torch.Tensor,
    coefs: torch.Tensor,
    output_scale: torch.Tensor | None,
    active: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prediction moved by the layer's innovation on the active stream (its output minus that prediction),
    weighted per token and stream (1 + coefs [K, K] over the modalities of the output); returns the corrected
    streams and the active one's, times `output_scale` [H] when the model scales it."""
    weights = F.linear(modalities(activated, norm, router, eps), coefs) + 1.0  # [T, K]
    innovation = activated - predictions[:, active]  # [T, H]
    corrected = innovation[:, None, :] * weights[:, :, None] + predictions  # [T, K, H]
    first = corrected[:, active]
    return corrected, first * output_scale if output_scale is not None else first


def add_to_others(streams: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The streams with x [T, H] added to all but the first (the per-layer input's share)."""
    out = streams.clone()
    out[:, 1:] += x[:, None, :]
    return out


def modalities(x: torch.Tensor, norm: torch.Tensor, router: torch.Tensor, eps: float) -> torch.Tensor:
    """The router's view of x [T, H]: tanh of a projection [K, H] of its RMS norm over hidden size."""
    routed = F.linear(F.rms_norm(x, norm.shape, norm, eps) * x.shape[-1] ** -1.0, router)
    return torch.tanh(routed.float()).to(x.dtype)  # [T, K]


def gaussian_top_k(x: torch.Tensor, std_multiplier: float) -> torch.Tensor:
    """Activation sparsity: each row keeps only what exceeds its mean by `std_multiplier` standard deviations (the
    normal quantile of the target sparsity), shifted down by that cutoff."""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    return F.relu(x - (mean + std * std_multiplier))


def split_gaussian_top_k(
    x: torch.Tensor, std_multiplier: float, width: int, all_reduce: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """gaussian_top_k of rows `width` wide split between tensor parallel ranks, x [T, I_rank] this rank's part: the
    mean and deviation are the whole row's, each rank's sums added by `all_reduce` (in place), in two passes as
    torch.std takes them (a sum of squares less the squared mean would lose the deviation to cancellation)."""
    mean = all_reduce(x.sum(dim=-1, keepdim=True)) / width  # [T, 1]
    variance = all_reduce((x - mean).square().sum(dim=-1, keepdim=True)) / width
    return F.relu(x - (mean + variance.sqrt() * std_multiplier))


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.mean(x**2, dim=-1, keepdim=True) ** 0.5


def _matched(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return x * target / torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
