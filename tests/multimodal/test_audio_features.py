"""Our Whisper log-mel features against transformers' WhisperFeatureExtractor called as Qwen2AudioProcessor calls it
(feature_size 128 as Qwen2-Audio has, and the default 80), on seeded noise and sines of several lengths in float32 and
float64: the same features, valid frames and mel filters; clips at 44.1 kHz resampled first; what we refuse. And the
resampler on its own: frequency, amplitude and length kept, tones above the new Nyquist removed, close to scipy's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

from sagellm.common.errors import FieldError, InvalidInput
from sagellm.runtime.models.audio_config import AudioConfig
from sagellm.runtime.multimodal.audio_features import (
    WhisperLogMelExtractor,
    mel_filter_bank,
)
from sagellm.runtime.multimodal.resample import resample

QWEN2_AUDIO_PREPROCESSOR = {  # Qwen/Qwen2-Audio-7B-Instruct's preprocessor_config.json
    "chunk_length": 30,
    "dither": 0.0,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "hop_length": 160,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "processor_class": "Qwen2AudioProcessor",
    "return_attention_mask": True,
    "sampling_rate": 16000,
}
LENGTHS = [1600, 16000, 116800, 480000, 12345]  # 0.1 s, 1 s, 7.3 s, exactly 30 s, an odd count at 16 kHz


def clip(kind: str, length: int, dtype: type, rate: int = 16000) -> np.ndarray:
    if kind == "noise":
        return (np.random.default_rng(length).standard_normal(length) * 0.1).astype(dtype)
    return (0.5 * np.sin(2 * np.pi * 440.0 * np.arange(length) / rate)).astype(dtype)


def hf_features(config: dict, samples: np.ndarray) -> tuple[torch.Tensor, int]:
    """transformers' input_features[0] and attention_mask.sum(), as Qwen2AudioProcessor asks for them."""
    extractor = WhisperFeatureExtractor(**config)
    out = extractor(samples, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    return out["input_features"][0], int(out["attention_mask"].sum())


@pytest.mark.parametrize("feature_size", [128, 80])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["noise", "sine"])
def test_features_equal_transformers(feature_size: int, length: int, dtype: type, kind: str) -> None:
    config = {**QWEN2_AUDIO_PREPROCESSOR, "feature_size": feature_size}
    samples = clip(kind, length, dtype)
    expected, expected_frames = hf_features(config, samples)
    ours = WhisperLogMelExtractor.from_config(config).extract(samples, 16000)
    assert ours.features.dtype == torch.float32
    assert ours.features.shape == expected.shape == (feature_size, 3000)
    assert float((ours.features - expected).abs().max()) <= 1e-5  # measured: 0.0, the same torch ops in order
    assert ours.valid_frames == expected_frames == math.ceil(length / 160)


@pytest.mark.parametrize("feature_size", [128, 80])
def test_mel_filter_bank_equals_transformers(feature_size: int) -> None:
    expected = hf_mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=feature_size,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_array_equal(mel_filter_bank(201, feature_size, 16000), expected)


def test_clip_at_44100_is_resampled_first() -> None:
    config = QWEN2_AUDIO_PREPROCESSOR
    samples = clip("sine", 44100 * 2 + 7, np.float32, rate=44100)
    expected, expected_frames = hf_features(config, resample(samples, 44100, 16000))
    ours = WhisperLogMelExtractor.from_config(config).extract(samples, 44100)
    assert float((ours.features - expected).abs().max()) <= 1e-5
    assert ours.valid_frames == expected_frames


def test_audio_tokens_match_qwen2_audio_encoder() -> None:
    frames = torch.arange(1, 3001)
    _, encoder_lengths = Qwen2AudioEncoder._get_feat_extract_output_lengths(None, frames)
    assert [AudioConfig.tokens_for_frames(int(f)) for f in frames] == encoder_lengths.tolist()
    assert AudioConfig.tokens_for_frames(3000) == 750


def test_refuses_clips_it_cannot_take() -> None:
    extractor = WhisperLogMelExtractor.from_config(QWEN2_AUDIO_PREPROCESSOR)
    with pytest.raises(InvalidInput, match=r"31\.00 s long.*at most 30 s"):
        extractor.extract(np.zeros(31 * 16000, np.float32), 16000)
    with pytest.raises(InvalidInput, match="at most 30 s"):
        extractor.extract(np.zeros(30 * 44100 + 1, np.float32), 44100)
    extractor.extract(np.zeros(30 * 44100, np.float32), 44100)  # exactly 30 s at any rate fits
    with pytest.raises(InvalidInput, match="empty"):
        extractor.extract(np.zeros(0, np.float32), 16000)
    with pytest.raises(InvalidInput, match="mono"):
        extractor.extract(np.zeros((2, 1600), np.float32), 16000)
    with pytest.raises(InvalidInput, match="floats"):
        extractor.extract(np.zeros(1600, np.int16), 16000)
    with pytest.raises(InvalidInput, match="sample rate"):
        extractor.extract(np.zeros(1600, np.float32), 0)


def test_config_defaults_and_errors() -> None:
    defaults = WhisperLogMelExtractor.from_config({"feature_extractor_type": "WhisperFeatureExtractor"})
    hf = WhisperFeatureExtractor()
    assert (defaults.feature_size, defaults.sampling_rate, defaults.hop_length) == (80, 16000, 160)
    assert (defaults.chunk_length, defaults.n_fft, defaults.padding_value) == (30, 400, 0.0)
    assert defaults.nb_max_frames == hf.nb_max_frames and defaults.max_samples == hf.n_samples
    for key, value in [("dither", 1e-4), ("feature_size", 0), ("hop_length", "160"), ("padding_value", "x")]:
        with pytest.raises(FieldError) as error:
            WhisperLogMelExtractor.from_config({**QWEN2_AUDIO_PREPROCESSOR, key: value})
        assert error.value.field == key
    with pytest.raises(FieldError, match="sampling_rate"):
        WhisperLogMelExtractor.from_config({"sampling_rate": 8000})


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def amplitude(samples: np.ndarray) -> float:
    """A sine's amplitude from its RMS, the start and end (where the filter meets the zero padding) left out."""
    return float(np.sqrt(np.mean(samples[200:-200].astype(np.float64) ** 2)) * np.sqrt(2))


@pytest.mark.parametrize("from_rate", [44100, 48000])
@pytest.mark.parametrize("length_seconds", [1.0, 0.7301])
def test_resample_keeps_frequency_amplitude_and_length(from_rate: int, length_seconds: float) -> None:
    length = int(from_rate * length_seconds)
    sine = np.sin(2 * np.pi * 1000.0 * np.arange(length) / from_rate).astype(np.float32)
    out = resample(sine, from_rate, 16000)
    assert out.dtype == np.float32
    assert len(out) == math.ceil(length * 16000 / from_rate)  # torchaudio's length
    assert abs(peak_hz(out, 16000) - 1000.0) <= 16000 / len(out)  # within one FFT bin
    assert amplitude(out) == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize("tone_hz", [10000.0, 12000.0, 15000.0])
def test_resample_removes_what_would_alias(tone_hz: float) -> None:
    """A tone above the new Nyquist frequency (8 kHz) would fold back into the band (10 kHz to 6 kHz); the lowpass
    removes it. Not a tone at 8 kHz itself: torchaudio's filter (cut-off 0.99 * 8 kHz, 6 zero crossings) passes
    the last few hundred Hz below and above its cut-off at -3 to -10 dB, and ours is the same filter."""
    tone = np.sin(2 * np.pi * tone_hz * np.arange(48000) / 48000 + 0.3).astype(np.float32)
    assert 20 * np.log10(amplitude(resample(tone, 48000, 16000))) < -40.0


@pytest.mark.parametrize(("from_rate", "to_rate"), [(44100, 16000), (48000, 16000), (8000, 16000)])
def test_resample_close_to_scipy(from_rate: int, to_rate: int) -> None:
    signal = pytest.importorskip("scipy.signal")
    t = np.arange(from_rate // 2) / from_rate
    samples = (0.6 * np.sin(2 * np.pi * 440.0 * t) + 0.3 * np.sin(2 * np.pi * 2500.0 * t)).astype(np.float32)
    gcd = math.gcd(from_rate, to_rate)
    expected = signal.resample_poly(samples.astype(np.float64), to_rate // gcd, from_rate // gcd)
    ours = resample(samples, from_rate, to_rate)
    assert len(ours) == len(expected)
    np.testing.assert_allclose(ours[200:-200], expected[200:-200], atol=1e-2)


def test_resample_identity_and_bad_rates() -> None:
    samples = np.random.default_rng(0).standard_normal(1000)
    np.testing.assert_array_equal(resample(samples, 16000, 16000), samples.astype(np.float32))
    with pytest.raises(InvalidInput, match="from_rate"):
        resample(samples, 0, 16000)
    with pytest.raises(InvalidInput, match="mono"):
        resample(samples.reshape(2, 500), 44100, 16000)
