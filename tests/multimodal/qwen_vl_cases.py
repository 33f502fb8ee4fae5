"""What the Qwen-VL generation tests share (test_qwen3_5_generate, test_qwen2_5_vl, test_qwen3_vl and the tower tests
beside them): random pictures, the placeholder their prompts write, prompts as the offline API takes them, and
transformers' greedy tokens for a prompt and its pictures, memoized per module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"  # what a Qwen-VL chat template writes for an image


def inputs_of(processor: Any, text: str, images: list[Image.Image]) -> Any:
    return processor(text=text, images=images or None, return_tensors="pt", add_special_tokens=False)


def greedy_references(model: Any, processor: Any, tokens: int) -> Callable[[str, list[Image.Image]], list[int]]:
    """transformers' greedy `tokens` tokens for a prompt and its pictures (memoized: each is asked for more than
    once)."""
    seen: dict[tuple, list[int]] = {}

    def generate(text: str, images: list[Image.Image]) -> list[int]:
        key = (text, *(id(image) for image in images))
        if key not in seen:
            inputs = inputs_of(processor, text, images)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
            seen[key] = out[0, inputs["input_ids"].shape[1] :].tolist()
        return seen[key]

    return generate


def prompt(text: str, *images: Image.Image) -> dict:
    return {"prompt": text, "multi_modal_data": {"image": list(images)}} if images else {"prompt": text}


def tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]
