"""A WAV file's bytes decoded to what a speech model's processor takes: float32 mono samples in [-1, 1) and their
sample rate, with the standard library's `wave` (integer PCM, 8 to 32 bits). The gateway decodes a request's audio
here to check it before it is sent on (gateway/media/audio.py), and the engine again from the file the request
carries (a few hundred kilobytes over the wire, not its samples)."""

from __future__ import annotations

import io
import wave

import numpy as np

from sagellm.common.errors import InvalidInput


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """(samples (T,) float32 mono: the channels averaged, sample rate in Hz); InvalidInput for bytes that are not
    integer-PCM WAV or hold no samples."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InvalidInput("not a WAV file (RIFF/WAVE); audio is read as WAV")
    try:
        with wave.open(io.BytesIO(data)) as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as error:  # wave.Error names the format: float and compressed WAV are not PCM
        raise InvalidInput(f"the WAV file cannot be read ({error}); send integer PCM WAV") from None
    if width not in (1, 2, 3, 4):
        raise InvalidInput(f"the WAV file has {8 * width}-bit samples; send 8, 16, 24 or 32-bit PCM")
    frame = channels * width
    frames = len(raw) // frame  # a truncated last frame is dropped
    if frames == 0 or rate <= 0:
        raise InvalidInput("the WAV file holds no samples")
    samples = _pcm_to_float(raw[: frames * frame], width)  # (T * C,)
    return samples.reshape(frames, channels).mean(axis=1, dtype=np.float32), rate  # (T,)


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    """Little-endian PCM of `width` bytes a sample as float32 in [-1, 1): WAV's 8-bit is unsigned, the rest signed."""
    if width == 1:
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    if width == 3:  # no numpy dtype: each sample into the top three bytes of an int32, then shifted back down
        packed = np.zeros((len(raw) // 3, 4), np.uint8)
        packed[:, 1:] = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        return (packed.view("<i4")[:, 0] >> 8).astype(np.float32) / 2**23
    return np.frombuffer(raw, f"<i{width}").astype(np.float32) / 2 ** (8 * width - 1)
