"""A model's media encoders, each built and lowered once like the decoder (models/encoder_graph.py through the same
`optimize` and `lower`): a picture's pixels or a clip's log-mel frames in, its embeddings out, one row per
placeholder token of its in the prompt, in the text model's width.

    encoder = EncoderRunner(loaded.config, loaded.weights, backend)
    embeds = encoder.encode(processed.pixel_values)  # [tokens_per_image, text hidden] per image
    embeds = encoder.encode(patch_rows, grids)  # Qwen3.5: its pictures' patch rows, and each one's token grid
    embeds = AudioEncoderRunner(loaded.config, loaded.weights, backend).encode(frames)  # [tokens, text hidden]

The inputs are the Hugging Face processor's (image_processing.image_processor_for and audio_features give the
same)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from sagellm.backends.base import HardwareBackend
from sagellm.backends.torch_ops.gemma4_vision import POSITION_COLUMNS
from sagellm.backends.torch_ops.qwen_vision import GridMetadata
from sagellm.backends.torch_ops.vision import EncoderMetadata
from sagellm.common.errors import InvalidInput
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.execution_graph.lowering import LoweringContext, lower
from sagellm.runtime.execution_graph.passes import optimize
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.encoder_graph import build_audio_graph, build_vision_graph

AUDIO_FRAMES_PAST_CLIP = 2  # the padding's frames the convolutions read past a clip's own (audio_prompts.py)


Grid = tuple[int, int, int]  # (t, h, w): the grid of a picture's placeholder tokens (MediaFeature.grid)


class Encoder(Protocol):
    def encode(self, inputs: torch.Tensor, grids: Sequence[Grid] | None = None) -> list[torch.Tensor]:
        """Its pictures' or clip's inputs -> each one's embeddings [tokens, text hidden] float32, in order;
        `grids`: each picture's token grid, where its inputs do not say it (Qwen3.5's patch rows)."""
        ...


class _GraphEncoder:
    """An encoder graph built for the model and lowered onto the backend. `linear_dtype`: the dtype its linears are
    packed in (EngineConfig.dtype), as the decoder's."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        backend: HardwareBackend,
        *,
        linear_dtype: torch.dtype = torch.float32,
    ) -> None:
        graph, head_dim = self._graph(config)
        self.device = backend.device
        context = LoweringContext(backend=backend, weights=weights, kv_caches=[], rope_tables={}, head_dim=head_dim,
                                  linear_dtype=linear_dtype)  # fmt: skip
        self.plan = lower(optimize(graph), context)

    def _graph(self, config: ModelConfig) -> tuple[Graph, int]:
        """The model's encoder graph and its attention's head size."""
        raise NotImplementedError


class EncoderRunner(_GraphEncoder):
    """A vision encoder."""

    def _graph(self, config: ModelConfig) -> tuple[Graph, int]:
        if config.vision is None:
            raise InvalidInput(f"this {config.architecture} model has no vision encoder: it takes no images")
        self.vision = config.vision
        return build_vision_graph(self.vision), self.vision.head_dim

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grids: Sequence[Grid] | None = None) -> list[torch.Tensor]:
        """pixel_values [N, C, H, W] -> each image's embeddings [tokens_per_image, text hidden] float32 (views of
        one tensor), in order. Gemma 4's tower takes its pictures' rows of patches instead (`_encode_patches`),
        Qwen-VL's (Qwen3.5's, Qwen2.5-VL's) their rows of patches and `grids` (`_encode_grids`)."""
        v = self.vision
        if v.takes_grids:
            return self._encode_grids(pixel_values, grids)
        if v.variable_tokens:
            return self._encode_patches(pixel_values)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (v.num_channels, v.image_size, v.image_size):
            raise InvalidInput(f"pixel_values of shape {tuple(pixel_values.shape)}: the vision tower takes [N, "
                               f"{v.num_channels}, {v.image_size}, {v.image_size}]")  # fmt: skip
        meta = EncoderMetadata((v.rows_per_image,) * pixel_values.shape[0])
        pixels = pixel_values.to(self.device, torch.float32)
        embeds = self.plan.run(pixel_values=pixels, encoder_metadata=meta)["embeds"]  # [N * tokens, text hidden]
        return list(embeds.split(v.tokens_per_image))

    def _encode_patches(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Gemma 4's pictures, each its rows [P, C * p * p + 2] (gemma4_vision.patch_rows; a picture's first patch
        is at (0, 0), and no other is), stacked -> each one's soft tokens [P / kernel^2, text hidden] float32."""
        v = self.vision
        width = v.num_channels * v.patch_size**2 + POSITION_COLUMNS
        if rows.dim() != 2 or rows.shape[1] != width:
            raise InvalidInput(f"patch rows of shape {tuple(rows.shape)}: Gemma 4's vision tower takes [patches, "
                               f"{width}]")  # fmt: skip
        starts = ((rows[:, -2] == 0) & (rows[:, -1] == 0)).nonzero().flatten().tolist()
        lengths = [end - start for start, end in zip(starts, [*starts[1:], rows.shape[0]])]
        if not starts or starts[0] != 0 or any(n % v.pooling_kernel**2 for n in lengths):
            raise InvalidInput(f"patch rows of pictures of {lengths} patches: each must start at (0, 0) and hold "
                               f"a multiple of {v.pooling_kernel ** 2}")  # fmt: skip
        meta = EncoderMetadata(tuple(lengths))
        embeds = self.plan.run(pixel_values=rows.to(self.device, torch.float32), encoder_metadata=meta)["embeds"]
        return list(embeds.split([n // v.pooling_kernel**2 for n in lengths]))

    def _encode_grids(self, rows: torch.Tensor, grids: Sequence[Grid] | None) -> list[torch.Tensor]:
        """Qwen-VL's pictures, each its patch rows [t * h * w * m^2, C * T * p * p] in its processor's order,
        stacked, and `grids`, each one's token grid (t, h, w) (m = spatial_merge_size: its patches are t frames of
        h * m by w * m) -> each one's embeddings [t * h * w, text hidden] float32."""
        v = self.vision
        m, width = v.spatial_merge_size, v.num_channels * v.temporal_patch_size * v.patch_size**2
        if grids is None or any(len(grid) != 3 or min(grid) < 1 for grid in grids):
            raise InvalidInput(f"Qwen-VL's vision tower takes each picture's token grid (t, h, w), not {grids!r}")
        tokens = [t * h * w for t, h, w in grids]
        if rows.dim() != 2 or rows.shape[1] != width or rows.shape[0] != sum(tokens) * m * m:
            raise InvalidInput(f"patch rows of shape {tuple(rows.shape)} for token grids {list(grids)}: the tower "
                               f"takes [{sum(tokens) * m * m}, {width}]")  # fmt: skip
        meta = GridMetadata.of([(t, h * m, w * m) for t, h, w in grids])
        embeds = self.plan.run(pixel_values=rows.to(self.device, torch.float32), encoder_metadata=meta)["embeds"]
        return list(embeds.split(tokens))


class AudioEncoderRunner(_GraphEncoder):
    """An audio encoder (Qwen2-Audio's), one clip a run."""

    def _graph(self, config: ModelConfig) -> tuple[Graph, int]:
        if config.audio is None:
            raise InvalidInput(f"this {config.architecture} model has no audio encoder: it takes no audio")
        self.audio = config.audio
        return build_audio_graph(self.audio), self.audio.head_dim

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor, grids: Sequence[Grid] | None = None) -> list[torch.Tensor]:
        """A clip's log-mel frames [1, mel, L + AUDIO_FRAMES_PAST_CLIP] (its own L frames, then the padding's the
        convolutions read) -> [its embeddings [tokens_for_frames(L), text hidden] float32]. (A clip has no grid.)"""
        a = self.audio
        length = frames.shape[-1] - AUDIO_FRAMES_PAST_CLIP
        if frames.dim() != 3 or frames.shape[:2] != (1, a.num_mel_bins) or not 0 < length <= a.max_frames:
            raise InvalidInput(f"log-mel frames of shape {tuple(frames.shape)}: the audio tower takes [1, "
                               f"{a.num_mel_bins}, at most {a.max_frames} + {AUDIO_FRAMES_PAST_CLIP}]")  # fmt: skip
        meta = EncoderMetadata((a.rows_for_frames(length),))
        rows = frames[0].t().to(self.device, torch.float32)  # [F, mel]
        return [self.plan.run(input_features=rows, encoder_metadata=meta)["embeds"]]
