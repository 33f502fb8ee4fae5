"""OpenAI's Files and Batch APIs through the official openai SDK, unchanged, against a gateway serving a tiny llama
and a tiny embedding model: a chat batch's results equal the same requests sent live (greedy), an embeddings batch's
vectors equal /v1/embeddings', a line the route refuses lands in the error file with its status, a bad input file
fails the batch with the line named, a cancel keeps what was done, a batch survives a gateway restart (every line
answered exactly once), and another key sees none of it."""

from __future__ import annotations

import json
import time

import numpy
import openai
import pytest

from tests.embedding.conftest import make_tiny_bert, write_sentence_transformers_files
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config

pytestmark = pytest.mark.slow

KEY, OTHER_KEY = "sk-batch-owner", "sk-someone-else"
EMBEDDER = "tiny-st"


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    bert = write_sentence_transformers_files(make_tiny_bert(tmp_path_factory.mktemp("bert") / EMBEDDER))
    config = tiny_config(
        tmp_path_factory.mktemp("batch"),
        embedding_model=str(bert),
        api_keys=[KEY, OTHER_KEY],
        served_model_name="tiny-llama",
    )
    return config, tiny_model


@pytest.fixture(scope="module")
def gateway(setup):
    config, model = setup
    with running_gateway(GRAPHS / "colocated.yaml", config, model) as gw:
        yield gw


def _client(gateway, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=120)


def _chat_line(i: int, **extra) -> dict:
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 6,
            "temperature": 0, **extra}  # fmt: skip
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def _upload(client: openai.OpenAI, lines: list[dict]) -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return client.files.create(file=("batch.jsonl", data), purpose="batch").id


def _finished(client: openai.OpenAI, batch_id: str, timeout_s: float = 240) -> openai.types.Batch:
    deadline = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    return batch


def _results(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    lines = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    return {line["custom_id"]: line for line in lines}


def test_a_chat_batch_answers_as_the_live_route(gateway) -> None:
    client = _client(gateway)
    lines = [_chat_line(i) for i in range(6)] + [_chat_line(99, max_tokens=-1)]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "nightly"})  # fmt: skip
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "nightly"}
    batch = _finished(client, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (7, 6, 1)
    outputs, errors = _results(client, batch.output_file_id), _results(client, batch.error_file_id)
    assert set(outputs) == {f"req-{i}" for i in range(6)} and set(errors) == {"req-99"}
    for i in (0, 5):
        live = client.chat.completions.create(**lines[i]["body"])
        answer = outputs[f"req-{i}"]["response"]
        assert answer["status_code"] == 200
        assert answer["body"]["choices"][0]["message"]["content"] == live.choices[0].message.content
    refused = errors["req-99"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "max_tokens"
    assert batch.id in [b.id for b in client.batches.list().data]


def test_an_embeddings_batch_equals_v1_embeddings(gateway) -> None:
    client = _client(gateway)
    texts = ["the quick fox", "hello world"]
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": EMBEDDER, "input": t}}
             for i, t in enumerate(texts)]  # fmt: skip
    batch = _finished(client, client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/embeddings",
                                                    completion_window="24h").id)  # fmt: skip
    outputs = _results(client, batch.output_file_id)
    live = client.embeddings.create(model=EMBEDDER, input=texts).data
    for i in range(2):
        vector = outputs[f"e{i}"]["response"]["body"]["data"][0]["embedding"]
        assert numpy.allclose(vector, live[i].embedding, atol=1e-6)


def test_a_bad_input_file_fails_the_batch_naming_the_line(gateway) -> None:
    client = _client(gateway)
    lines = [_chat_line(1), {**_chat_line(2), "url": "/v1/completions"}, _chat_line(1)]
    batch = _finished(
        client,
        client.batches.create(
            input_file_id=_upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    assert batch.status == "failed" and batch.output_file_id is None
    assert [(e.code, e.line) for e in batch.errors.data] == [("mismatched_url", 2), ("duplicate_custom_id", 3)]


@pytest.mark.parametrize(
    "metadata", [{"k" * 65: "v"}, {"k": "v" * 513}, {f"k{i}": "v" for i in range(17)}], ids=["key", "value", "pairs"]
)
def test_metadata_past_openais_bounds_is_a_400_naming_it(gateway, metadata) -> None:
    """Batches, responses and conversations bound `metadata` with one type (gateway/http/metadata.py)."""
    client = _client(gateway)
    file_id = _upload(client, [_chat_line(1)])
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata=metadata)  # fmt: skip
    assert refused.value.body["param"] == "metadata"
    with pytest.raises(openai.BadRequestError) as refused:
        client.conversations.create(metadata=metadata)
    assert refused.value.body["param"] == "metadata"


def test_cancel_keeps_what_was_done(gateway) -> None:
    client = _client(gateway)
    lines = [_chat_line(i, max_tokens=48, ignore_eos=True) for i in range(40)]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    while client.batches.retrieve(batch.id).request_counts.completed < 1:
        time.sleep(0.1)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = _finished(client, batch.id)
    assert batch.status == "cancelled" and 1 <= batch.request_counts.completed < 40
    assert len(_results(client, batch.output_file_id)) == batch.request_counts.completed
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_another_key_sees_none_of_it(gateway) -> None:
    client, other = _client(gateway), _client(gateway, OTHER_KEY)
    file_id = _upload(client, [_chat_line(1)])
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(file_id)
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert file_id not in [f.id for f in other.files.list().data]
    assert client.files.delete(file_id).deleted and file_id not in [f.id for f in client.files.list().data]


def test_a_batch_survives_a_restart(setup) -> None:
    config, model = setup
    lines = [_chat_line(i, max_tokens=64, ignore_eos=True) for i in range(32)]
    with running_gateway(GRAPHS / "colocated.yaml", config, model) as gw:
        client = _client(gw)
        batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/chat/completions",
                                      completion_window="24h")  # fmt: skip
        while client.batches.retrieve(batch.id).request_counts.completed < 2:
            time.sleep(0.05)
    kept = config.state_dir / "batches"
    assert json.loads((kept / f"{batch.id}.json").read_text())["status"] == "in_progress"  # stopped mid-way
    assert 2 <= len((kept / f"{batch.id}.out.jsonl").read_text().splitlines()) < len(lines)
    with running_gateway(GRAPHS / "colocated.yaml", config, model) as gw:
        client = _client(gw)
        done = _finished(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == len(lines), done
        text = client.files.content(done.output_file_id).text
        ids = [json.loads(line)["custom_id"] for line in text.splitlines()]
        assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # each exactly once
