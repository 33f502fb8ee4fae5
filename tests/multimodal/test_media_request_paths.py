"""Pictures on the request paths a text prompt takes, on the tiny Qwen3.5 (its multimodal rotary positions and
recurrent states the hardest to keep): sequences with pictures preempted for want of blocks recompute to
transformers' tokens; `n` choices about one picture encode it once and each gets transformers' tokens; and through
the gateway, with a picture in the conversation, the openai SDK's `n`, a JSON schema and a required tool call are
honoured (the reply is the schema's, the call the tool's)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from sagellm import LLM, SamplingParams
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.multimodal.pictures import data_url, png_of
from tests.multimodal.qwen_vl_cases import prompt, tokens
from tests.multimodal.test_qwen3_5_generate import BIG, ONE, TALL, TWO, WIDE
from tests.multimodal.test_qwen3_5_generate import hf as hf  # the fixtures: transformers on the tiny Qwen3.5
from tests.multimodal.test_qwen3_5_generate import qwen as qwen
from tests.multimodal.test_qwen3_5_generate import reference as reference  # and its greedy tokens
from tests.tiny_qwen_vl_models import make_tiny_qwen3_5_vision

TOKENS = 8


def test_sequences_with_pictures_preempted_for_blocks_recompute_to_transformers_tokens(qwen, reference):
    """4-token blocks, 20 of them: four prompts of 20 to 40 tokens and their 8 new ones cannot all hold blocks."""
    llm = LLM(str(qwen), max_num_seqs=4, num_kv_blocks=20, block_size=4, enable_prefix_caching=False)
    cases = [(ONE, [WIDE]), (TWO, [BIG, TALL]), (ONE, [TALL]), (ONE, [BIG])]
    outputs = llm.generate([prompt(text, *images) for text, images in cases],
                           SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True))  # fmt: skip
    assert sum(out.metrics.num_preemptions for out in outputs) > 0
    assert tokens(outputs) == [reference(text, images) for text, images in cases]


def test_n_choices_about_one_picture_encode_it_once_and_each_get_transformers_tokens(qwen, reference):
    llm = LLM(str(qwen), max_num_seqs=4, num_kv_blocks=64)
    out = llm.generate(prompt(TWO, BIG, TALL), SamplingParams(n=3, max_tokens=TOKENS, temperature=0, ignore_eos=True))
    assert [choice.token_ids for choice in out[0].outputs] == [reference(TWO, [BIG, TALL])] * 3
    assert llm.engine.runner.encoder.misses == 2  # its two pictures, once


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[openai.OpenAI]:
    """The same tiny Qwen3.5 (its weights the `qwen` fixture's) with room for a tool's schema in the prompt."""
    roomy = make_tiny_qwen3_5_vision(
        tmp_path_factory.mktemp("roomy") / "qwen", text_settings={"max_position_embeddings": 2048}
    )
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path_factory.mktemp("gw")), roomy) as gateway:
        yield openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def about_a_picture(text: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(png_of(WIDE))}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


SCHEMA = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                                           "objects": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["colour", "objects"], "additionalProperties": False}  # fmt: skip


def test_a_json_schema_about_a_picture_is_followed(client):
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=about_a_picture("describe it as JSON"), max_tokens=40,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA}},
    )  # fmt: skip
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)


def test_a_required_tool_call_about_a_picture_follows_the_tools_parameters(client):
    tool = {"type": "function", "function": {"name": "report_scene", "description": "Report what the picture shows",
                                             "parameters": SCHEMA}}  # fmt: skip
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=about_a_picture("what is in it?"), max_tokens=200,
        temperature=0, tools=[tool], tool_choice="required", parallel_tool_calls=False,
    )  # fmt: skip
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "report_scene"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)


def test_n_choices_through_the_sdk_are_each_transformers_tokens(client, hf, reference):
    processor = hf[1]
    content = [{"type": "image"}, {"type": "text", "text": "what is in it?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=about_a_picture("what is in it?"), max_tokens=TOKENS, n=2,
        temperature=0, extra_body={"return_token_ids": True, "min_tokens": TOKENS},
    )  # fmt: skip
    assert [choice.token_ids for choice in reply.choices] == [reference(text, [WIDE])] * 2
