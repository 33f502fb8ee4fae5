"""`sagellm run-batch`, vLLM's offline form of the Batch API, as a user runs it (a real process on a tiny llama):
every line answered once in OpenAI's output format, greedy answers the same as `sagellm chat`'s for the same turn,
a line the route refuses written with its status (and exit status 1), a bad input file refused naming its line."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_gateway_cli import sagellm
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("run-batch") / "tiny-llama")


def _line(custom_id: str, text: str, **body) -> dict:
    asked = {"model": "tiny-llama", "messages": [{"role": "user", "content": text}], "max_tokens": 6,
             "temperature": 0, **body}  # fmt: skip
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": asked}


def test_a_file_of_requests_is_answered_line_by_line(tiny, tmp_path):
    lines = [_line(f"q{i}", f"Count to {i}.") for i in range(5)] + [_line("bad", "hi", max_tokens=-1)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ran = sagellm(tmp_path, "run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                  str(tiny), "--no-embedding", "--served-model-name", "tiny-llama")  # fmt: skip
    assert ran.returncode == 1, ran.stderr  # one line was refused
    assert "5 answered, 1 refused" in ran.stderr
    results = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert sorted(results) == sorted(x["custom_id"] for x in lines)
    assert results["bad"]["response"]["status_code"] == 400
    chat = sagellm(tmp_path, "chat", str(tiny), "--max-tokens", "6", "--temperature", "0", input_text="Count to 3.")
    assert results["q3"]["response"]["body"]["choices"][0]["message"]["content"].strip() == chat.stdout.strip()


def test_a_bad_input_file_is_refused_naming_the_line(tiny, tmp_path):
    lines = [_line("a", "hi"), {**_line("b", "hi"), "url": "/v1/embeddings"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ran = sagellm(tmp_path, "run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                  str(tiny), "--no-embedding")  # fmt: skip
    assert ran.returncode == 1 and "line 2: this batch's lines go to /v1/chat/completions" in ran.stderr, ran.stderr
