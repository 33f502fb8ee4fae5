"""The image preprocessing for a checkpoint, picked by its preprocessor_config.json's "image_processor_type" the way
Hugging Face's AutoImageProcessor picks a class, and equal to that class's output (its PIL/NumPy backend, which the
torchvision "Fast" one approximates): CLIP (LLaVA-1.5), SigLIP (Gemma 3, PaliGemma), Qwen2-VL (Qwen2.5-VL, Qwen3-VL),
Idefics3 (SmolVLM) and Gemma 4. We carry our own so the server needs neither transformers nor torchvision.

    processor = image_processor_for(preprocessor_config, processor_config)
    processed = processor.preprocess(images)  # pixel_values, num_tokens per image, the family's extras
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sagellm.common.errors import FieldError
from sagellm.runtime.multimodal.clip import ClipImageProcessor
from sagellm.runtime.multimodal.gemma4_images import Gemma4ImageProcessor
from sagellm.runtime.multimodal.idefics3 import Idefics3ImageProcessor
from sagellm.runtime.multimodal.processed_images import ImageProcessor, ProcessedImages
from sagellm.runtime.multimodal.qwen_vl import QwenVLImageProcessor
from sagellm.runtime.multimodal.siglip import SiglipImageProcessor

__all__ = ["ImageProcessor", "ProcessedImages", "image_processor_for", "IMAGE_PROCESSOR_TYPES"]

# HF's class name (without its "Fast" or "Pil" suffix) -> ours, from (preprocessor_config, processor_config).
Builder = Callable[[Mapping, Mapping], ImageProcessor]
IMAGE_PROCESSOR_TYPES: dict[str, Builder] = {
    "CLIPImageProcessor": ClipImageProcessor.from_config,
    "LlavaImageProcessor": ClipImageProcessor.from_config,
    "SiglipImageProcessor": lambda pre, proc: SiglipImageProcessor.from_config(pre, proc, is_gemma3=False),
    "Gemma3ImageProcessor": lambda pre, proc: SiglipImageProcessor.from_config(pre, proc, is_gemma3=True),
    "Qwen2VLImageProcessor": lambda pre, proc: QwenVLImageProcessor.from_config(pre),
    "Qwen2_5_VLImageProcessor": lambda pre, proc: QwenVLImageProcessor.from_config(pre),
    "Idefics3ImageProcessor": Idefics3ImageProcessor.from_config,
    "SmolVLMImageProcessor": Idefics3ImageProcessor.from_config,
    "Gemma4ImageProcessor": Gemma4ImageProcessor.from_config,
}


def image_processor_for(preprocessor_config: Mapping, processor_config: Mapping | None = None) -> ImageProcessor:
    """The preprocessing a checkpoint's preprocessor_config.json describes. `processor_config` (its
    processor_config.json, or the matching settings of config.json) gives what counts an image's prompt tokens where
    the preprocessor's file does not: LLaVA's patch_size, num_additional_image_tokens and
    vision_feature_select_strategy, Gemma 3's image_seq_length, Idefics3's image_seq_len."""
    kind = str(preprocessor_config.get("image_processor_type", ""))
    builder = IMAGE_PROCESSOR_TYPES.get(kind.removesuffix("Fast").removesuffix("Pil"))
    if builder is None:
        known = ", ".join(IMAGE_PROCESSOR_TYPES)
        raise FieldError(
            "image_processor_type", f"image_processor_type: {kind!r} is not one we preprocess; we take {known}"
        )
    return builder(preprocessor_config, processor_config or {})
