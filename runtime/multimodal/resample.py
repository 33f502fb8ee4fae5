"""Band-limited resampling of mono audio, as torchaudio.functional.resample does it by default (a Hann-windowed sinc
lowpass at rolloff * min(rate) / 2, applied polyphase): a clip at 44.1 or 48 kHz reaches an audio encoder at the rate
its feature extractor was trained on (Whisper's 16 kHz), without the server needing torchaudio, librosa or scipy.

The two rates are reduced by their gcd to `orig` input and `new` output samples per period; each of the `new` output
phases has its own filter, and a strided convolution applies all of them at once."""

from __future__ import annotations

import math

import numpy as np
import torch

from sagellm.common.errors import InvalidInput

LOWPASS_FILTER_WIDTH = 6  # zero crossings of the sinc on each side: sharper cut-off, longer filter
ROLLOFF = 0.99  # the cut-off as a fraction of the lower Nyquist frequency, below it to leave room for the transition


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """float32 [ceil(n * to_rate / from_rate)] of a mono float [n] at `from_rate` Hz, resampled to `to_rate` Hz; the
    samples themselves (as float32) where the rates are equal."""
    for name, rate in (("from_rate", from_rate), ("to_rate", to_rate)):
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            raise InvalidInput(f"resample: {name} {rate!r} is not a positive whole number of samples per second")
    waveform = np.asarray(samples, dtype=np.float32)
    if waveform.ndim != 1:
        raise InvalidInput(f"resample: audio must be mono, one sample per time step; got shape {waveform.shape}")
    if from_rate == to_rate:
        return waveform
    gcd = math.gcd(from_rate, to_rate)
    orig, new = from_rate // gcd, to_rate // gcd
    kernels, width = _sinc_kernels(orig, new)
    signal = torch.from_numpy(waveform)[None, None]  # 1, 1, n
    signal = torch.nn.functional.pad(signal, (width, width + orig))
    phases = torch.nn.functional.conv1d(signal, kernels, stride=orig)  # 1, new, periods
    resampled = phases.transpose(1, 2).reshape(-1)  # periods * new, output samples in time order
    target_length = math.ceil(new * len(waveform) / orig)
    return resampled[:target_length].numpy()


def _sinc_kernels(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """The `new` phase filters (float32 [new, 1, 2 * width + orig]) and `width`, the taps each side of a period.

    Output phase j sits at input time j * orig / new; its filter samples the windowed sinc at the input samples
    around it, scaled so a constant passes through with gain 1."""
    cutoff = min(orig, new) * ROLLOFF  # twice the lowpass cut-off, in units where the rates are `orig` and `new`
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig  # 1, 1, taps
    offsets = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new  # new, 1, 1
    t = ((offsets + taps) * cutoff).clamp(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)  # new, 1, taps
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2  # Hann, zero at the clamped ends
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (sinc * window * (cutoff / orig)).to(torch.float32), width
