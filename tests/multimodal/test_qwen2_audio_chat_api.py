"""Audio through the OpenAI chat API: the openai SDK, unchanged, sends `input_audio` parts (base64 WAV) and vLLM's
`audio_url` parts (an http URL of a test server on 127.0.0.1 the operator allowed) to `sagellm serve` on the tiny
Qwen2-Audio, and the reply's tokens are transformers' for the same chat and clips, colocated and through the PD
graph; an MP3, a file that is not WAV, a clip over 30 s and audio sent to a model without an audio encoder are each a
400 naming what is wrong."""

from __future__ import annotations

import base64
import io
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from sagellm.runtime.multimodal.wav import decode_wav
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.multimodal.file_server import file_server
from tests.tiny_audio_models import make_tiny_qwen2_audio
from tests.tiny_models import make_tiny_llama

TOKENS = 6


def wav(seconds: float, seed: int, rate: int = 16000) -> bytes:
    samples = 0.2 * np.random.default_rng(seed).standard_normal(int(rate * seconds))
    out = io.BytesIO()
    with wave.open(out, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes((samples.clip(-1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


FIRST, SECOND = wav(0.8, 1), wav(1.7, 2)


@pytest.fixture(scope="module")
def files() -> Iterator[str]:
    with file_server({"/second.wav": SECOND}) as url:
        yield url


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio") / "qwen2-audio")


@pytest.fixture(scope="module")
def client(checkpoint, tmp_path_factory) -> Iterator[openai.OpenAI]:
    config = tiny_config(tmp_path_factory.mktemp("gw"), allowed_media_domains=["127.0.0.1"])
    with running_gateway(GRAPHS / "colocated.yaml", config, checkpoint) as gateway:
        yield openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


def input_audio(data: bytes, audio_format: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": audio_format}}


def chat(client: openai.OpenAI, *parts: dict):
    content = [*parts, {"type": "text", "text": "what do you hear"}]
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": content}],
        max_tokens=TOKENS, temperature=0, extra_body={"return_token_ids": True},
    )  # fmt: skip


def reference(checkpoint: Path, *clips: bytes) -> list[int]:
    """transformers' greedy tokens for the same chat, rendered and processed by the checkpoint's processor, on the
    clips' samples as the WAV files hold them."""
    model = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    content = [{"type": "audio", "audio": "clip"} for _ in clips] + [{"type": "text", "text": "what do you hear"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
    inputs = processor(text=text, audio=[decode_wav(c)[0] for c in clips], sampling_rate=16000, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_the_model_card_says_it_hears_audio(client):
    (card,) = client.models.list().data
    assert card.model_extra["input_modalities"] == ["text", "audio"]


def test_the_sdk_sends_input_audio_and_an_allowed_audio_url_and_gets_transformers_tokens(client, files, checkpoint):
    reply = chat(client, input_audio(FIRST), {"type": "audio_url", "audio_url": {"url": f"{files}/second.wav"}})
    assert reply.choices[0].token_ids == reference(checkpoint, FIRST, SECOND)
    assert reply.usage.prompt_tokens > 20 + 42  # the clips' placeholders counted: 20 and 42 tokens


def test_tokenize_counts_each_clip_as_the_chat_is_charged(client, files, checkpoint):
    """/tokenize on the same chat gives the processor's ids, each clip's placeholder expanded to its frames."""
    parts = [input_audio(FIRST), {"type": "audio_url", "audio_url": {"url": f"{files}/second.wav"}}]
    content = [*parts, {"type": "text", "text": "what do you hear"}]
    body = {"model": client.models.list().data[0].id, "messages": [{"role": "user", "content": content}]}
    tokenized = httpx.post(str(client.base_url).removesuffix("/v1/") + "/tokenize", json=body, timeout=60).json()
    processor = AutoProcessor.from_pretrained(checkpoint)
    template = [{"type": "audio", "audio": "clip"}] * 2 + [{"type": "text", "text": "what do you hear"}]
    text = processor.apply_chat_template([{"role": "user", "content": template}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
    inputs = processor(text=text, audio=[decode_wav(c)[0] for c in (FIRST, SECOND)], sampling_rate=16000)
    assert tokenized["tokens"] == inputs["input_ids"][0]
    assert tokenized["count"] == chat(client, *parts).usage.prompt_tokens


def test_the_responses_apis_input_audio_gets_transformers_reply(client, checkpoint):
    """The openai SDK's Responses `input_audio` parts reach the engine as the chat's: the reply is transformers'
    greedy tokens decoded; an MP3 is refused naming the Responses part."""
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(FIRST).decode(), "format": "wav"}}
    content = [audio, {"type": "input_text", "text": "what do you hear"}]
    model = client.models.list().data[0].id
    reply = client.responses.create(model=model, input=[{"role": "user", "content": content}],
                                    max_output_tokens=TOKENS, temperature=0)  # fmt: skip
    tokenizer = AutoProcessor.from_pretrained(checkpoint).tokenizer
    expected = reference(checkpoint, FIRST)
    assert reply.output_text == tokenizer.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert reply.usage.output_tokens == len(expected)
    mp3 = {"type": "input_audio", "input_audio": {"data": audio["input_audio"]["data"], "format": "mp3"}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=model, input=[{"role": "user", "content": [mp3]}], max_output_tokens=TOKENS)
    assert refused.value.body["param"] == "input[0].content[0].input_audio.format", refused.value.body


@pytest.mark.parametrize(
    ("part", "param", "words"),
    [
        (input_audio(b"ID3....", "mp3"), "messages[0].content[0].input_audio.format", "send wav"),
        (input_audio(b"RIFF not really a wave file"), "messages[0].content[0].input_audio.data", "not a wav"),
        ({"type": "input_audio", "input_audio": {"format": "wav"}}, "messages[0].content[0].input_audio", "base64"),
        ({"type": "audio_url", "audio_url": {"url": "http://localhost:9/x.wav"}}, "messages[0].content[0].audio_url",
         "not allowed"),
    ],
)  # fmt: skip
def test_audio_that_cannot_be_read_is_a_400_naming_the_part(client, part, param, words):
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, part)
    assert refused.value.body["param"] == param, refused.value.body
    assert words in refused.value.body["message"].lower(), refused.value.body


def test_a_clip_over_thirty_seconds_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="at most 30 s"):
        chat(client, input_audio(wav(30.5, 3)))


def test_a_model_without_an_audio_encoder_refuses_audio_with_a_400(tmp_path):
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path), make_tiny_llama(tmp_path / "m")) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="takes no audio"):
            chat(client, input_audio(FIRST))


def test_through_the_pd_graph_the_decode_worker_continues_the_clips_prompt_as_transformers(checkpoint, tmp_path):
    """The prefill worker encodes the clips; the decode worker takes its KV for the expanded prompt, cached under
    the clips' keys."""
    with running_gateway(GRAPHS / "pd.yaml", tiny_config(tmp_path), checkpoint) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        assert chat(client, input_audio(SECOND), input_audio(FIRST)).choices[0].token_ids == reference(
            checkpoint, SECOND, FIRST
        )


def test_through_the_epd_graph_the_clips_pass_the_encode_node_and_the_prefill_worker_encodes_them(checkpoint, tmp_path):
    """The encode node runs images only: a clip goes on to the prefill worker, which encodes it itself."""
    with running_gateway(GRAPHS / "epd.yaml", tiny_config(tmp_path), checkpoint) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        assert chat(client, input_audio(FIRST)).choices[0].token_ids == reference(checkpoint, FIRST)
