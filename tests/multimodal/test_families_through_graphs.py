"""Every family that sees images, served through `graphs/pd.yaml` (the prefill worker expands, encodes and prefills;
the decode worker continues from its KV, cached under the pictures' keys, at the positions they shifted) and
`graphs/epd.yaml` (the encode node expands and encodes; the embeddings travel to the prefill worker as frames, a
Qwen-VL picture's grid and Qwen3-VL's DeepStack columns with them): the openai SDK's chat with two images of
different shapes, and a text-only chat, get transformers' greedy tokens for the same chat, rendered and processed
by the checkpoint's own processor. Each family's tiny random checkpoint is tests/tiny_vision_models'."""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.multimodal.pictures import png
from tests.tiny_qwen_vl_models import (
    make_tiny_qwen2_5_vl,
    make_tiny_qwen3_5_vision,
    make_tiny_qwen3_vl,
    qwen2_5_vl_processor,
    qwen3_5_processor,
)
from tests.tiny_vision_models import (
    gemma4_processor,
    make_tiny_gemma3_vision,
    make_tiny_gemma4_vision,
    make_tiny_idefics3,
    make_tiny_llava,
)

TOKENS = 6


PICTURES = (png(1, (70, 120)), png(2, (96, 64)))

# family -> (its tiny checkpoint's maker, its Hugging Face processor)
FAMILIES: dict[str, tuple[Callable[[Path], Path], Callable[[Path], Any]]] = {
    "llava": (make_tiny_llava, AutoProcessor.from_pretrained),
    "idefics3": (make_tiny_idefics3, AutoProcessor.from_pretrained),
    "smolvlm": (functools.partial(make_tiny_idefics3, smolvlm=True), AutoProcessor.from_pretrained),
    "gemma3": (make_tiny_gemma3_vision, AutoProcessor.from_pretrained),
    "gemma4": (make_tiny_gemma4_vision, gemma4_processor),
    "qwen3_5": (make_tiny_qwen3_5_vision, qwen3_5_processor),
    "qwen2_5_vl": (make_tiny_qwen2_5_vl, qwen2_5_vl_processor),
    "qwen3_vl": (make_tiny_qwen3_vl, qwen3_5_processor),
}


def content(images: int) -> list[dict]:
    """The user's turn as Hugging Face templates take it: "look at <image> and <image> and"."""
    parts = [{"type": "text", "text": "look at"}]
    for _ in range(images):
        parts += [{"type": "image"}, {"type": "text", "text": "and"}]
    return parts


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[Path, list[list[int]]]:
    """The family's checkpoint, and transformers' greedy tokens for the chat with both pictures and without."""
    make, processor_of = FAMILIES[request.param]
    checkpoint = make(tmp_path_factory.mktemp(request.param) / request.param)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    processor = processor_of(checkpoint)
    expected = []
    for pictures in ([Image.open(io.BytesIO(p)) for p in PICTURES], []):
        text = processor.apply_chat_template([{"role": "user", "content": content(len(pictures))}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        inputs = processor(text=text, images=[pictures] if pictures else None, return_tensors="pt",
                           add_special_tokens=False)  # fmt: skip
        with torch.inference_mode():
            out = model.eval().generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
        expected.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    return checkpoint, expected


def chat(client: openai.OpenAI, pictures: tuple[bytes, ...]) -> list[int]:
    parts: list[dict] = [{"type": "text", "text": "look at"}]
    for data in pictures:
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        parts += [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "and"}]
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": parts}], max_tokens=TOKENS,
        temperature=0, extra_body={"return_token_ids": True, "min_tokens": TOKENS},
    )  # fmt: skip
    return reply.choices[0].token_ids


@pytest.mark.parametrize("graph", ["pd.yaml", "epd.yaml"])
def test_two_pictures_and_a_text_chat_through_the_graph_give_transformers_tokens(family, graph, tmp_path):
    checkpoint, expected = family
    with running_gateway(GRAPHS / graph, tiny_config(tmp_path), checkpoint) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        assert [chat(client, PICTURES), chat(client, ())] == expected
