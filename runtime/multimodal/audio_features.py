"""Whisper's log-mel features, which Qwen2-Audio's audio encoder takes, computed as transformers'
WhisperFeatureExtractor does on its torch path (the one it takes whenever torch is installed) when Qwen2AudioProcessor
calls it: the clip padded with silence to chunk_length seconds, a Hann-windowed STFT whose last frame is dropped, the
power spectrum through a Slaney mel filter bank, log10 floored 8 decades below the loudest bin and scaled to about
[-1, 1]. Ours, so the server runs without transformers; a clip at another rate is resampled first (HF refuses it),
and a clip longer than the window is refused (HF would cut it silently, and the model would never hear the rest)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from sagellm.common.errors import FieldError, InvalidInput
from sagellm.runtime.multimodal.preprocessor_settings import positive_int, setting
from sagellm.runtime.multimodal.resample import resample

MEL_MAX_FREQUENCY = 8000.0  # Whisper's filters stop at 8 kHz whatever the sampling rate
LOG_FLOOR = 1e-10  # mel power clamped here before log10: silence would be -inf
DYNAMIC_RANGE = 8.0  # decades kept below the clip's loudest bin


@dataclass(frozen=True)
class LogMel:
    features: torch.Tensor  # float32 [feature_size, nb_max_frames]: the clip padded to chunk_length seconds
    valid_frames: int  # frames of the clip itself: HF's attention_mask.sum(), Qwen2-Audio's feature_attention_mask


@dataclass(frozen=True)
class WhisperLogMelExtractor:
    feature_size: int  # mel bins
    sampling_rate: int
    hop_length: int
    chunk_length: int  # seconds every clip is padded to
    n_fft: int
    padding_value: float

    @classmethod
    def from_config(cls, preprocessor: Mapping) -> WhisperLogMelExtractor:
        """A checkpoint's preprocessor_config.json (feature_extractor_type WhisperFeatureExtractor), HF's defaults for
        what it leaves out. dither must be 0: dithering adds random noise, so the same clip would give other features
        on every request."""
        dither = _number(preprocessor, "dither", 0.0)
        if dither != 0.0:
            raise FieldError("dither", f"dither: {dither!r}; only 0 is supported (dithering makes features random)")
        extractor = cls(
            feature_size=positive_int(preprocessor, "feature_size", 80),
            sampling_rate=positive_int(preprocessor, "sampling_rate", 16000),
            hop_length=positive_int(preprocessor, "hop_length", 160),
            chunk_length=positive_int(preprocessor, "chunk_length", 30),
            n_fft=positive_int(preprocessor, "n_fft", 400),
            padding_value=_number(preprocessor, "padding_value", 0.0),
        )
        if extractor.sampling_rate < 2 * MEL_MAX_FREQUENCY:
            raise FieldError(
                "sampling_rate",
                f"sampling_rate: {extractor.sampling_rate} Hz cannot hold Whisper's mel bands up to "
                f"{MEL_MAX_FREQUENCY:g} Hz; it must be at least {2 * MEL_MAX_FREQUENCY:g}",
            )
        return extractor

    @property
    def max_samples(self) -> int:
        return self.chunk_length * self.sampling_rate

    @property
    def nb_max_frames(self) -> int:
        return self.max_samples // self.hop_length

    @cached_property
    def mel_filters(self) -> torch.Tensor:
        """float32 [1 + n_fft // 2, feature_size]."""
        bank = mel_filter_bank(1 + self.n_fft // 2, self.feature_size, self.sampling_rate)
        return torch.from_numpy(bank).to(torch.float32)

    def extract(self, samples: np.ndarray, sample_rate: int) -> LogMel:
        """The features of a mono clip of float samples in [-1, 1] at `sample_rate` Hz."""
        waveform = np.asarray(samples)
        if not np.issubdtype(waveform.dtype, np.floating):
            raise InvalidInput(
                f"audio samples must be floats in [-1, 1]; got {waveform.dtype} (scale integer PCM by its full range)"
            )
        if waveform.ndim != 1:
            raise InvalidInput(f"audio must be mono, one sample per time step; got an array of shape {waveform.shape}")
        if waveform.size == 0:
            raise InvalidInput("the audio clip is empty; give at least one sample")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise InvalidInput(f"the audio's sample rate {sample_rate!r} is not a positive whole number of Hz")
        seconds = waveform.size / sample_rate
        if seconds > self.chunk_length:
            raise InvalidInput(
                f"the audio clip is {seconds:.2f} s long; this model hears at most {self.chunk_length} s per clip, "
                "so split it into shorter clips"
            )
        waveform = resample(waveform, sample_rate, self.sampling_rate)  # float32, as HF casts float64
        padded = np.full(self.max_samples, self.padding_value, dtype=np.float32)
        padded[: waveform.size] = waveform
        # HF's mask is one per sample, taken every hop_length samples, the last dropped when they do not divide
        valid_frames = min(math.ceil(waveform.size / self.hop_length), self.nb_max_frames)
        return LogMel(self._log_mel(torch.from_numpy(padded)), valid_frames)

    def _log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """float32 [feature_size, nb_max_frames] of a float32 [max_samples]."""
        window = torch.hann_window(self.n_fft)
        stft = torch.stft(waveform, self.n_fft, self.hop_length, window=window, return_complex=True)  # bins, frames
        power = stft[..., :-1].abs() ** 2  # bins, nb_max_frames: the frame centred past the end dropped
        log_spec = torch.clamp(self.mel_filters.T @ power, min=LOG_FLOOR).log10()  # mels, frames
        log_spec = torch.maximum(log_spec, log_spec.max() - DYNAMIC_RANGE)
        return (log_spec + 4.0) / 4.0


def mel_filter_bank(num_frequency_bins: int, num_mel_filters: int, sampling_rate: int) -> np.ndarray:
    """float64 [num_frequency_bins, num_mel_filters]: triangles evenly spaced on the Slaney mel scale from 0 to 8 kHz,
    each divided by its width in Hz so every band carries about the same energy (transformers'
    mel_filter_bank(..., norm="slaney", mel_scale="slaney"), librosa's default)."""
    mel_points = np.linspace(0.0, _hertz_to_mel(MEL_MAX_FREQUENCY), num_mel_filters + 2)
    band_edges = _mel_to_hertz(mel_points)  # filter i rises from edge i, peaks at i + 1, falls to i + 2
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    slopes = band_edges[None, :] - fft_freqs[:, None]  # bins, edges
    edge_gaps = np.diff(band_edges)
    rising = -slopes[:, :-2] / edge_gaps[:-1]
    falling = slopes[:, 2:] / edge_gaps[1:]
    triangles = np.maximum(0.0, np.minimum(rising, falling))  # bins, mels
    return triangles * (2.0 / (band_edges[2:] - band_edges[:-2]))[None, :]


# The Slaney mel scale: linear (3 mels per 200 Hz) below 1 kHz (15 mels), logarithmic (27 mels per factor 6.4) above;
# written as transformers writes it, so the filters agree to the last bit.
_LOG_START_HZ = 1000.0
_LOG_START_MEL = 15.0


def _hertz_to_mel(hertz: float) -> float:
    if hertz < _LOG_START_HZ:
        return 3.0 * hertz / 200.0
    return _LOG_START_MEL + np.log(hertz / _LOG_START_HZ) * (27.0 / np.log(6.4))


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    linear = 200.0 * mels / 3.0
    logarithmic = _LOG_START_HZ * np.exp(np.log(6.4) / 27.0 * (mels - _LOG_START_MEL))
    return np.where(mels >= _LOG_START_MEL, logarithmic, linear)


def _number(config: Mapping, key: str, default: float) -> float:
    value = setting(config, key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FieldError(key, f"{key}: {value!r} is not a number")
    return float(value)
