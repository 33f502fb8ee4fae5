"""Gemma 3's images through the gateway: the openai SDK's `image_url` parts (a data URL, and an http URL of a test
server on 127.0.0.1 the operator allowed) and the anthropic SDK's `image` blocks, sent unchanged to `sagellm serve`
on the tiny Gemma 3 (tests/tiny_vision_models.make_tiny_gemma3_vision), get transformers' tokens for the same chat
and images (through `graphs/pd.yaml` and `graphs/epd.yaml`: test_families_through_graphs.py)."""

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
from transformers import AutoProcessor, Gemma3ForConditionalGeneration

from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.multimodal.file_server import file_server
from tests.multimodal.pictures import data_url, png
from tests.tiny_vision_models import make_tiny_gemma3_vision

TOKENS = 6


FIRST, SECOND = png(1, (33, 21)), png(2, (48, 60))


@pytest.fixture(scope="module")
def files() -> Iterator[str]:
    with file_server({"/second.png": SECOND}) as url:
        yield url


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> Path:
    return make_tiny_gemma3_vision(tmp_path_factory.mktemp("gemma3") / "gemma3")


@pytest.fixture(scope="module")
def gateway(gemma3, tmp_path_factory) -> Iterator:
    config = tiny_config(tmp_path_factory.mktemp("gw"), allowed_media_domains=["127.0.0.1"])
    with running_gateway(GRAPHS / "colocated.yaml", config, gemma3) as running:
        yield running


def look_at(images: int) -> list[dict]:
    """The user's turn every request here sends, as Hugging Face templates take it: "look at <image> and ..."."""
    parts = [{"type": "text", "text": "look at"}]
    for _ in range(images):
        parts += [{"type": "image"}, {"type": "text", "text": "and"}]
    return parts


def reference(gemma3: Path, *images: bytes) -> list[int]:
    """transformers' greedy tokens for the chat, rendered and processed by the checkpoint's processor."""
    model = Gemma3ForConditionalGeneration.from_pretrained(gemma3, dtype=torch.float32, attn_implementation="eager")
    processor = AutoProcessor.from_pretrained(gemma3)
    text = processor.apply_chat_template([{"role": "user", "content": look_at(len(images))}],
                                         add_generation_prompt=True)  # fmt: skip
    inputs = processor(text=text, images=[Image.open(io.BytesIO(i)) for i in images], return_tensors="pt",
                       add_special_tokens=False)  # fmt: skip
    with torch.inference_mode():
        out = model.eval().generate(**inputs, max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
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


def test_the_model_card_says_it_reads_images(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    assert client.models.list().data[0].model_extra["input_modalities"] == ["text", "image"]


def test_the_openai_sdks_data_url_and_allowed_http_image_give_transformers_tokens(gateway, files, gemma3):
    reply = openai_chat(gateway.url, data_url(FIRST), f"{files}/second.png")
    assert reply.choices[0].token_ids == reference(gemma3, FIRST, SECOND)
    assert reply.usage.prompt_tokens > 2 * 16  # each image's 16 soft tokens counted


def test_the_anthropic_sdks_image_block_gives_transformers_tokens(gateway, gemma3):
    client = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=300)
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(SECOND).decode()}
    blocks = [{"type": "text", "text": "look at"}, {"type": "image", "source": source}, {"type": "text", "text": "and"}]
    message = client.messages.create(
        model=gateway.core.model_name, max_tokens=TOKENS, messages=[{"role": "user", "content": blocks}],
        extra_body={"temperature": 0, "min_tokens": TOKENS},
    )  # fmt: skip
    tokenizer = AutoProcessor.from_pretrained(gemma3).tokenizer
    expected = tokenizer.decode(reference(gemma3, SECOND), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(block.text for block in message.content if block.type == "text") == expected
    assert message.usage.output_tokens == TOKENS


def processor_ids(gemma3: Path, *images: bytes) -> list[int]:
    """The chat's prompt ids as the checkpoint's processor gives them: each image's blank lines joined to the
    prompt's newlines, its 16 soft tokens between <start_of_image> and <end_of_image>."""
    processor = AutoProcessor.from_pretrained(gemma3)
    text = processor.apply_chat_template([{"role": "user", "content": look_at(len(images))}],
                                         add_generation_prompt=True)  # fmt: skip
    inputs = processor(text=text, images=[Image.open(io.BytesIO(i)) for i in images], add_special_tokens=False)
    return inputs["input_ids"][0]


def test_tokenize_and_count_tokens_count_each_image_as_served(gateway, files, gemma3):
    """vLLM's /tokenize on a chat with images gives the expanded prompt the request is charged: the processor's
    ids, and a chat's prompt_tokens; the Messages API's count_tokens counts an image block the same way."""
    parts = [{"type": "text", "text": "look at"}, {"type": "image_url", "image_url": {"url": data_url(FIRST)}},
             {"type": "text", "text": "and"}, {"type": "image_url", "image_url": {"url": f"{files}/second.png"}},
             {"type": "text", "text": "and"}]  # fmt: skip
    body = {"model": gateway.core.model_name, "messages": [{"role": "user", "content": parts}]}
    tokenized = httpx.post(f"{gateway.url}/tokenize", json=body, timeout=60).json()
    assert tokenized["tokens"] == processor_ids(gemma3, FIRST, SECOND)
    assert tokenized["count"] == openai_chat(gateway.url, data_url(FIRST), f"{files}/second.png").usage.prompt_tokens
    client = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=300)
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(SECOND).decode()}
    blocks = [{"type": "text", "text": "look at"}, {"type": "image", "source": source}, {"type": "text", "text": "and"}]
    message = [{"role": "user", "content": blocks}]
    counted = client.messages.count_tokens(model=gateway.core.model_name, messages=message)
    assert counted.input_tokens == len(processor_ids(gemma3, SECOND))


def test_tokenize_refuses_an_image_it_may_not_read_naming_the_part(gateway):
    parts = [
        {"type": "text", "text": "look at"},
        {"type": "image_url", "image_url": {"url": "http://localhost:9/x.png"}},
    ]
    body = {"model": gateway.core.model_name, "messages": [{"role": "user", "content": parts}]}
    refused = httpx.post(f"{gateway.url}/tokenize", json=body, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages[0].content[1].image_url"
