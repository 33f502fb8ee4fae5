"""Qwen3.5's images through the gateway: the openai SDK's `image_url` parts (a data URL, and an http URL of a test
server on 127.0.0.1 the operator allowed) and the anthropic SDK's `image` blocks, sent unchanged to `sagellm serve`
on the tiny Qwen3.5 (tests/tiny_qwen_vl_models.make_tiny_qwen3_5_vision), get transformers' tokens for the same chat
and images; /tokenize counts each picture's tokens as its processor does (through `graphs/pd.yaml` and
`graphs/epd.yaml`: test_families_through_graphs.py)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import torch
from PIL import Image
from transformers import Qwen3_5ForConditionalGeneration

from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.multimodal.file_server import file_server
from tests.multimodal.pictures import data_url, png
from tests.tiny_qwen_vl_models import make_tiny_qwen3_5_vision, qwen3_5_processor

TOKENS = 6


FIRST, SECOND = png(1, (96, 64)), png(2, (70, 120))  # token grids (1, 2, 3) and (1, 4, 2)


@pytest.fixture(scope="module")
def files() -> Iterator[str]:
    with file_server({"/second.png": SECOND}) as url:
        yield url


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return make_tiny_qwen3_5_vision(tmp_path_factory.mktemp("qwen3_5") / "qwen3_5")


@pytest.fixture(scope="module")
def gateway(qwen, tmp_path_factory) -> Iterator:
    config = tiny_config(tmp_path_factory.mktemp("gw"), allowed_media_domains=["127.0.0.1"])
    with running_gateway(GRAPHS / "colocated.yaml", config, qwen) as running:
        yield running


def look_at(images: int) -> list[dict]:
    parts = [{"type": "text", "text": "look at"}]
    for _ in range(images):
        parts += [{"type": "image"}, {"type": "text", "text": "and"}]
    return parts


def processed(qwen: Path, *images: bytes):
    processor = qwen3_5_processor(qwen)
    text = processor.apply_chat_template([{"role": "user", "content": look_at(len(images))}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    pictures = [Image.open(io.BytesIO(i)) for i in images]
    return processor(text=text, images=pictures, return_tensors="pt", add_special_tokens=False)


def reference(qwen: Path, *images: bytes) -> list[int]:
    """transformers' greedy tokens for the chat, rendered and processed by the checkpoint's processor."""
    model = Qwen3_5ForConditionalGeneration.from_pretrained(qwen, dtype=torch.float32).eval()
    inputs = processed(qwen, *images)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def openai_chat(url: str, *images: str):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    parts = [{"type": "text", "text": "look at"}]
    for image in images:
        parts += [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "and"}]
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": parts}], max_tokens=TOKENS,
        temperature=0, extra_body={"return_token_ids": True, "min_tokens": TOKENS},
    )  # fmt: skip


def test_the_openai_sdks_data_url_and_allowed_http_image_give_transformers_tokens(gateway, files, qwen):
    reply = openai_chat(gateway.url, data_url(FIRST), f"{files}/second.png")
    assert reply.choices[0].token_ids == reference(qwen, FIRST, SECOND)
    assert reply.usage.prompt_tokens == len(processed(qwen, FIRST, SECOND)["input_ids"][0])


def test_the_anthropic_sdks_image_block_gives_transformers_tokens(gateway, qwen):
    client = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=300)
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(SECOND).decode()}
    blocks = [{"type": "text", "text": "look at"}, {"type": "image", "source": source}, {"type": "text", "text": "and"}]
    message = client.messages.create(
        model=gateway.core.model_name, max_tokens=TOKENS, messages=[{"role": "user", "content": blocks}],
        extra_body={"temperature": 0, "min_tokens": TOKENS},
    )  # fmt: skip
    tokenizer = qwen3_5_processor(qwen).tokenizer
    expected = tokenizer.decode(reference(qwen, SECOND), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(block.text for block in message.content if block.type == "text") == expected


def test_tokenize_counts_each_pictures_tokens_as_its_processor(gateway, qwen):
    parts = [{"type": "text", "text": "look at"}, {"type": "image_url", "image_url": {"url": data_url(SECOND)}},
             {"type": "text", "text": "and"}]  # fmt: skip
    body = {"model": gateway.core.model_name, "messages": [{"role": "user", "content": parts}]}
    tokenized = httpx.post(f"{gateway.url}/tokenize", json=body, timeout=60).json()
    assert tokenized["tokens"] == processed(qwen, SECOND)["input_ids"][0].tolist()
