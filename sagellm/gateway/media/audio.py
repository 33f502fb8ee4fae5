"""Audio's bytes decoded to what a speech model's processor takes: float32 mono samples in [-1, 1) and their sample
rate. WAV (integer PCM, 8 to 32 bits) as the engine decodes it (runtime/multimodal/wav.py); MP3, which OpenAI's
`input_audio` also allows, needs a decoder this server does not install, so it is refused with a message that says
to send WAV. Resampling to the model's rate is the processor's job."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sagellm.common.errors import InvalidInput
from sagellm.gateway.media.refusal import refused
from sagellm.runtime.multimodal import wav

MP3_REFUSED = "MP3 audio cannot be decoded by this server (no MP3 decoder is installed); send WAV"


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # (T,) float32, mono: the channels averaged
    sample_rate: int  # Hz


def decode_audio(data: bytes, param: str) -> Audio:
    """The audio in `data`, whose format is told by its first bytes (a URL's audio carries no `format` field)."""
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):  # an MP3's tag or frame
        raise refused(param, MP3_REFUSED)
    return decode_wav(data, param)


def decode_wav(data: bytes, param: str) -> Audio:
    """A WAV file's samples; a 400 naming `param` for bytes that are not integer-PCM WAV or hold no samples."""
    try:
        samples, rate = wav.decode_wav(data)
    except InvalidInput as error:
        raise refused(param, str(error)) from None
    return Audio(samples, rate)
