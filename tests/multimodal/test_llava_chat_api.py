"""Images through the OpenAI chat API: the openai SDK, unchanged, sends `image_url` parts (a data URL, and an http
URL of a test server on 127.0.0.1 the operator allowed) to `sagellm serve` on the tiny LLaVA, and the reply's tokens
are transformers' for the same chat and images; a host not allowed, a redirect, a corrupt image and a part without a
URL are each a 400 naming the part, and a model without a vision encoder refuses images with a 400."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.multimodal.file_server import file_server
from tests.tiny_models import make_tiny_llama
from tests.tiny_vision_models import make_tiny_llava

TOKENS = 6


def png(seed: int, size: tuple[int, int] = (33, 21)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG")
    return out.getvalue()


FIRST, SECOND = png(1), png(2, (48, 60))


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def files() -> Iterator[str]:
    with file_server(
        {"/second.png": SECOND, "/broken.png": b"\x89PNG not really"}, {"/moved.png": "/second.png"}
    ) as url:
        yield url


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "llava")


@pytest.fixture(scope="module")
def client(llava, tmp_path_factory) -> Iterator[openai.OpenAI]:
    config = tiny_config(tmp_path_factory.mktemp("gw"), allowed_media_domains=["127.0.0.1"])
    with running_gateway(GRAPHS / "colocated.yaml", config, llava) as gateway:
        yield openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, *urls: str, model: str | None = None):
    parts = [{"type": "text", "text": "look at"}]
    for url in urls:
        parts += [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": " and"}]
    return client.chat.completions.create(
        model=model or client.models.list().data[0].id, messages=[{"role": "user", "content": parts}],
        max_tokens=TOKENS, temperature=0, extra_body={"return_token_ids": True},
    )  # fmt: skip


def reference(llava: Path, *images: bytes) -> list[int]:
    """transformers' greedy tokens for the same chat, rendered and processed by the checkpoint's processor."""
    hf = LlavaForConditionalGeneration.from_pretrained(llava, dtype=torch.float32, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(llava)
    parts = [{"type": "text", "text": "look at"}]
    for _ in images:
        parts += [{"type": "image"}, {"type": "text", "text": " and"}]
    text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    inputs = processor(text=text, images=[Image.open(io.BytesIO(i)) for i in images], return_tensors="pt")
    with torch.inference_mode():
        out = hf.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_the_model_card_says_it_reads_images(client):
    (card,) = client.models.list().data
    assert card.model_extra["input_modalities"] == ["text", "image"]


def test_the_sdk_sends_a_data_url_and_an_allowed_http_image_and_gets_transformers_tokens(client, files, llava):
    reply = chat(client, data_url(FIRST), f"{files}/second.png")
    assert reply.choices[0].token_ids == reference(llava, FIRST, SECOND)
    assert reply.usage.prompt_tokens > 8  # the images' placeholders counted: 4 tokens each


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://localhost:9/x.png", "is not allowed"),  # the same machine by another name: not listed
        ("{files}/moved.png", "redirect"),
        ("{files}/broken.png", "image"),
        ("ftp://127.0.0.1/x.png", "urls are not read"),
    ],
)
def test_what_may_not_be_read_is_a_400_naming_the_part(client, files, url, words):
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, url.format(files=files))
    assert refused.value.body["param"] == "messages[0].content[1].image_url", refused.value.body
    assert words in refused.value.body["message"].lower(), refused.value.body


def named_chat(client: openai.OpenAI, image: dict | None, uuid: str, api_key: str = "unused"):
    """A chat whose image part carries vLLM's `uuid`, its `image_url` given or None (the name alone)."""
    parts = [{"type": "text", "text": "look at"}, {"type": "image_url", "image_url": image, "uuid": uuid},
             {"type": "text", "text": " and"}]  # fmt: skip
    return client.with_options(api_key=api_key).chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": parts}],
        max_tokens=TOKENS, temperature=0, extra_body={"return_token_ids": True},
    )  # fmt: skip


def test_a_part_naming_an_image_by_uuid_alone_reads_the_one_sent_under_it(client, llava):
    """vLLM's `uuid`: sent once with its data, later by name alone; the engine sees the same picture (transformers'
    tokens, its blocks read from the prefix cache), and a name the server holds nothing under is a 400 asking for
    the data."""
    first = named_chat(client, {"url": data_url(SECOND)}, "the-second-picture")
    again = named_chat(client, None, "the-second-picture")
    assert first.choices[0].token_ids == again.choices[0].token_ids == reference(llava, SECOND)
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    with pytest.raises(openai.BadRequestError) as unknown:
        named_chat(client, None, "never-sent")
    assert unknown.value.body["param"] == "messages[0].content[1].image_url", unknown.value.body
    assert "send the data with the uuid" in unknown.value.body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        named_chat(client, None, "")
    assert bad.value.body["param"] == "messages[0].content[1].uuid", bad.value.body


def test_a_model_without_a_vision_encoder_refuses_images_with_a_400(tmp_path):
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path), make_tiny_llama(tmp_path / "m")) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="takes no images"):
            chat(client, data_url(FIRST))
