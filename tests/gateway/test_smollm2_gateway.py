"""The issue's finish line on the real default models: `sagellm gateway start` in the background, then the official
`openai` SDK chats with SmolLM2-135M-Instruct (plain and streamed, greedy replies equal to the offline API's) and
embeds with all-MiniLM-L6-v2 (equal to the embedding engine's vectors), then `sagellm gateway stop`."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import openai
import pytest

from tests.gateway.conftest import free_port

# Over the suite's 300 s timeout: `gateway start` downloads both models, so its CLI calls (start, stop) get 900 s each.
pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(1800)]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def sagellm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sagellm.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip


def test_gateway_start_then_the_openai_sdk_chats_and_embeds(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGELLM_HOME", str(tmp_path / "home"))  # a fresh model cache and state dir
    env = dict(os.environ)
    port = free_port()
    started = sagellm("gateway", "start", "--port", str(port), env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        models = [m.id for m in client.models.list().data]
        assert models == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
        reply = client.chat.completions.create(model=models[0], messages=CHAT, temperature=0, max_tokens=24)
        streamed = client.chat.completions.create(
            model=models[0], messages=CHAT, temperature=0, max_tokens=24, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
        assert text == reply.choices[0].message.content and "Paris" in text

        from sagellm import LLM, SamplingParams

        offline = LLM("smollm2-135m-instruct").chat(CHAT, SamplingParams(temperature=0, max_tokens=24))
        assert text == offline[0].outputs[0].text

        texts = ["The cat sits on the mat.", "Paris is the capital of France."]
        vectors = client.embeddings.create(model=models[1], input=texts).data  # base64 on the wire, as the SDK asks
        from sagellm.runtime.embedding import EmbeddingEngine
        from sagellm.runtime.models.model_cache import resolve_model

        expected = EmbeddingEngine(resolve_model("all-minilm-l6-v2")).embed(texts).embeddings
        for got, want in zip(vectors, expected):
            assert np.allclose(got.embedding, np.asarray(want), atol=1e-5)
    finally:
        stopped = sagellm("gateway", "stop", env=env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
