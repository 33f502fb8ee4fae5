"""Images through the Anthropic Messages API and the Responses API, each run as the chat it is: the anthropic SDK's
`image` blocks (a base64 source, and a url source on a test server on 127.0.0.1 the operator allowed) and the
openai SDK's `input_image` parts (a data URL, an allowed http URL) reach the tiny LLaVA as the chat's `image_url`
parts, and the reply is transformers' greedy reply for the same chat and images. Neither API returns token ids, so
the comparison is the reply's text against transformers' tokens decoded as the server decodes them (special tokens
skipped, spaces not cleaned up), with the counts the replies report: the prompt's tokens (the images' placeholders
expanded) and the reply's. The tiny checkpoint's greedy reply does not change with its images' pixels (tried: other
images, swapped, solid colours, other seeds), so that the images' files themselves reached the engine is shown by the
prefix cache, whose block keys hold their hashes: the same message again reads cached blocks, one with another image
in the first's place reads none. What may not be read is a 400 naming the API's own block or part."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.multimodal.test_llava_chat_api import FIRST, SECOND, TOKENS, data_url, png
from tests.multimodal.test_llava_chat_api import files as files  # the fixtures: the allowed image server,
from tests.multimodal.test_llava_chat_api import llava as llava  # and the tiny checkpoint

pytestmark = pytest.mark.slow

PREFIX = "data:image/png;base64,"
B64 = data_url(FIRST).removeprefix(PREFIX)


@pytest.fixture(scope="module")
def gateway(llava, tmp_path_factory) -> Iterator:
    config = tiny_config(tmp_path_factory.mktemp("gw"), allowed_media_domains=["127.0.0.1"])
    with running_gateway(GRAPHS / "colocated.yaml", config, llava) as running:
        yield running


def look_at(images: int) -> list[dict]:
    """The user's turn every request here sends, as Hugging Face templates take it: "look at <image> and ..."."""
    parts = [{"type": "text", "text": "look at"}]
    for _ in range(images):
        parts += [{"type": "image"}, {"type": "text", "text": " and"}]
    return parts


def expected(llava: Path, messages: list[dict], *images: bytes) -> tuple[int, list[int], str]:
    """(the prompt's tokens, the reply's tokens, its text) of transformers' greedy reply to `messages` and `images`,
    rendered and processed by the checkpoint's processor, the text decoded as the server's detokenizer does."""
    hf = LlavaForConditionalGeneration.from_pretrained(llava, dtype=torch.float32, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(llava)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[Image.open(io.BytesIO(i)) for i in images], return_tensors="pt")
    with torch.inference_mode():
        out = hf.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
    prompt = inputs["input_ids"].shape[1]
    tokens = out[0, prompt:].tolist()
    text = processor.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return prompt, tokens, text


def anthropic_message(gateway, *sources: dict) -> anthropic.types.Message:
    blocks: list[dict] = [{"type": "text", "text": "look at"}]
    for source in sources:
        blocks += [{"type": "image", "source": source}, {"type": "text", "text": " and"}]
    client = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=300)
    return client.messages.create(
        model=gateway.core.model_name, max_tokens=TOKENS, messages=[{"role": "user", "content": blocks}],
        extra_body={"temperature": 0},  # this SDK's create() takes sampling settings as extra body fields
    )  # fmt: skip


def response(gateway, *images: dict):
    parts: list[dict] = [{"type": "input_text", "text": "look at"}]
    for image in images:
        parts += [{"type": "input_image", **image}, {"type": "input_text", "text": " and"}]
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    return client.responses.create(
        model=gateway.core.model_name, input=[{"role": "user", "content": parts}], max_output_tokens=TOKENS,
        temperature=0,
    )  # fmt: skip


def test_anthropic_image_blocks_base64_and_url_give_transformers_reply(gateway, files, llava):
    base64_source = {"type": "base64", "media_type": "image/png", "data": B64}
    message = anthropic_message(gateway, base64_source, {"type": "url", "url": f"{files}/second.png"})
    prompt, tokens, text = expected(llava, [{"role": "user", "content": look_at(2)}], FIRST, SECOND)
    assert "".join(block.text for block in message.content if block.type == "text") == text
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == prompt  # 4 placeholders per image
    assert message.usage.output_tokens == len(tokens)
    # the images' files reached the engine: their hashes key the prompt's cached blocks
    again = anthropic_message(gateway, base64_source, {"type": "url", "url": f"{files}/second.png"}).usage
    other = {"type": "base64", "media_type": "image/png", "data": data_url(png(11)).removeprefix(PREFIX)}
    another = anthropic_message(gateway, other, {"type": "url", "url": f"{files}/second.png"}).usage
    assert again.cache_read_input_tokens > 0 and another.cache_read_input_tokens == 0


def test_responses_input_images_data_url_and_http_give_transformers_reply(gateway, files, llava):
    reply = response(gateway, {"image_url": data_url(FIRST)}, {"image_url": f"{files}/second.png", "detail": "low"})
    prompt, tokens, text = expected(llava, [{"role": "user", "content": look_at(2)}], FIRST, SECOND)
    assert reply.output_text == text
    assert reply.usage.input_tokens == prompt and reply.usage.output_tokens == len(tokens)


def test_a_responses_follow_up_sees_the_earlier_inputs_image_again(gateway, llava):
    """A stored response keeps its input's image parts: `previous_response_id` continues the chat with the image
    where it stood, as transformers sees the whole conversation."""
    first = response(gateway, {"image_url": data_url(SECOND)})
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    follow_up = client.responses.create(
        model=gateway.core.model_name, input="and now?", previous_response_id=first.id, max_output_tokens=TOKENS,
        temperature=0,
    )  # fmt: skip
    conversation = [
        {"role": "user", "content": look_at(1)},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "and now?"},
    ]
    prompt, tokens, text = expected(llava, conversation, SECOND)
    assert follow_up.output_text == text and follow_up.usage.input_tokens == prompt


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ({"type": "url", "url": "http://localhost:9/x.png"}, "is not allowed"),
        ({"type": "url", "url": "{files}/broken.png"}, "image"),
        ({"type": "base64", "media_type": "text/plain", "data": B64}, "image/* type"),
        ({"type": "file", "file_id": "file_1"}, "files are not stored"),
    ],
)
def test_an_anthropic_image_that_may_not_be_read_is_a_400_naming_the_block(gateway, files, source, words):
    source = {key: value.format(files=files) for key, value in source.items()}
    with pytest.raises(anthropic.BadRequestError) as refused:
        anthropic_message(gateway, source)
    message = refused.value.body["error"]["message"]
    assert message.startswith("messages[0].content[1].source") and words in message, message


def test_anthropic_count_tokens_counts_image_blocks_as_the_message_is_charged(gateway, files, llava):
    client = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0)
    base64_source = {"type": "base64", "media_type": "image/png", "data": B64}
    url_source = {"type": "url", "url": f"{files}/second.png"}
    blocks = [{"type": "text", "text": "look at"}, {"type": "image", "source": base64_source},
              {"type": "text", "text": " and"}, {"type": "image", "source": url_source},
              {"type": "text", "text": " and"}]  # fmt: skip
    message = [{"role": "user", "content": blocks}]
    counted = client.messages.count_tokens(model=gateway.core.model_name, messages=message)
    assert counted.input_tokens == expected(llava, [{"role": "user", "content": look_at(2)}], FIRST, SECOND)[0]
    disallowed = [{"type": "image", "source": {"type": "url", "url": "http://localhost:9/x.png"}}]
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[0\]\.content\[0\]\.source.*is not allowed"):
        client.messages.count_tokens(model=gateway.core.model_name, messages=[{"role": "user", "content": disallowed}])


@pytest.mark.parametrize(
    ("image", "param", "words"),
    [
        ({"image_url": "http://localhost:9/x.png"}, "input[0].content[1].image_url", "is not allowed"),
        ({"image_url": "{files}/moved.png"}, "input[0].content[1].image_url", "redirect"),
        ({"file_id": "file_1"}, "input[0].content[1].file_id", "files are not stored"),
        ({"image_url": data_url(FIRST), "detail": "huge"}, "input[0].content[1].detail", "auto, low, high"),
    ],
)
def test_a_responses_image_that_may_not_be_read_is_a_400_naming_the_part(gateway, files, image, param, words):
    image = {key: value.format(files=files) for key, value in image.items()}
    with pytest.raises(openai.BadRequestError) as refused:
        response(gateway, image)
    assert refused.value.body["param"] == param, refused.value.body
    assert words in refused.value.body["message"], refused.value.body
