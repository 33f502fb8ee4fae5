"""A model's vision encoder, built and lowered once like the decoder (models/encoder_graph.py through the same
`optimize` and `lower`): a step's images in, each image's embeddings out, one row per placeholder token of its in
the prompt, in the text model's width.

    encoder = EncoderRunner(loaded.config, loaded.weights, backend)
    embeds = encoder.encode(processed.pixel_values)  # [tokens_per_image, text hidden] per image

The pixel values are the Hugging Face processor's (image_processing.image_processor_for gives the same)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sagellm.backends.base import HardwareBackend
from sagellm.backends.torch_ops.vision import EncoderMetadata
from sagellm.common.errors import InvalidInput
from sagellm.runtime.execution_graph.lowering import LoweringContext, lower
from sagellm.runtime.execution_graph.passes import optimize
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.encoder_graph import build_vision_graph


class EncoderRunner:
    """`linear_dtype`: the dtype the encoder's linears are packed in (EngineConfig.dtype), as the decoder's."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        backend: HardwareBackend,
        *,
        linear_dtype: torch.dtype = torch.float32,
    ) -> None:
        if config.vision is None:
            raise InvalidInput(f"this {config.architecture} model has no vision encoder: it takes no images")
        self.vision = config.vision
        self.device = backend.device
        context = LoweringContext(backend=backend, weights=weights, kv_caches=[], rope_tables={},
                                  head_dim=self.vision.head_dim, linear_dtype=linear_dtype)  # fmt: skip
        self.plan = lower(optimize(build_vision_graph(self.vision)), context)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [N, C, H, W] -> each image's embeddings [tokens_per_image, text hidden] float32 (views of
        one tensor), in order."""
        v = self.vision
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (v.num_channels, v.image_size, v.image_size):
            raise InvalidInput(f"pixel_values of shape {tuple(pixel_values.shape)}: the vision tower takes [N, "
                               f"{v.num_channels}, {v.image_size}, {v.image_size}]")  # fmt: skip
        meta = EncoderMetadata((v.rows_per_image,) * pixel_values.shape[0])
        pixels = pixel_values.to(self.device, torch.float32)
        embeds = self.plan.run(pixel_values=pixels, encoder_metadata=meta)["embeds"]  # [N * tokens, text hidden]
        return list(embeds.split(v.tokens_per_image))
