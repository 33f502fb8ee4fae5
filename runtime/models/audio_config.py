"""What a model's audio encoder is, as the audio encoder graph (encoder_graph.build_audio_graph) reads it: a
Whisper-style tower over a clip's log-mel frames and the projector into the text model's embedding space
(Qwen2-Audio's). Loaders translate a checkpoint's settings into it (architectures/hf_audio_config.py); a model that
hears nothing has none (`ModelConfig.audio` is None).

The tower reads at most `max_frames` frames (30 s: Whisper's window); two convolutions (the second of stride 2) make
a row of every two frames, the rows attend to each other, and each two rows are averaged into one embedding: a
clip of L frames gives tokens_for_frames(L) embeddings, one per placeholder token of its run in the prompt."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AudioConfig:
    hidden_size: int  # d_model
    intermediate_size: int  # encoder_ffn_dim
    num_layers: int
    num_heads: int
    num_mel_bins: int
    max_source_positions: int  # the tower's rows at most: its learned positions
    activation: str  # the tower MLP's graph op (gelu)
    layer_norm_eps: float
    text_hidden_size: int  # the projector's output: the text model's embedding width
    audio_token_id: int  # the placeholder id whose rows take the projected embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_frames(self) -> int:
        """The log-mel frames of the longest clip the tower reads (3,000 at 10 ms a frame: 30 s)."""
        return 2 * self.max_source_positions

    @staticmethod
    def rows_for_frames(frames: int) -> int:
        """The tower's rows for a clip of `frames` frames: the stride-2 convolution's outputs over them."""
        return (frames - 1) // 2 + 1

    @classmethod
    def tokens_for_frames(cls, frames: int) -> int:
        """The embeddings (placeholder tokens) a clip of `frames` frames gives: its rows averaged in pairs, as
        Qwen2-Audio's processor counts them."""
        return (cls.rows_for_frames(frames) - 2) // 2 + 1
