"""Failover and resume through the gateway, with real processes and servers on 127.0.0.1:
- one of two engine worker processes killed (SIGKILL) during 16 greedy streams: every stream ends once, with
  `length` and exactly the tokens an uninterrupted run gives, up to a tie that fp32 rounding breaks (those on the
  lost worker resumed on the other one from their prompt and the tokens so far, with what is left of their
  `min_tokens`), and the gateway counts the resumed retries (also with gpt-oss's layer, and for chats about an
  image); the same for 16 streams of 4 seeded sampled choices each (every choice resumes on its own and draws what
  it would have), and for 16 chats whose replies are constrained to a JSON schema (through the openai SDK): each
  resumed one still follows the schema;
- one of two attached servers gone between two health checks: the requests sent to it are tried again on the other
  before any token, and all succeed;
- a request whose instance gives no token in time ends with a `timeout` (HTTP 504, or an error event once
  streaming) once nothing is left to try."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
import signal
import threading
import time
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from sagellm.gateway.config import FailoverPolicy
from tests.gateway.conftest import GRAPHS, LOCAL_UPSTREAMS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.gateway.test_instances import attach
from tests.tiny_audio_models import make_tiny_qwen2_audio
from tests.tiny_models import make_tiny_gemma4, make_tiny_gpt_oss, make_tiny_llama, make_tiny_qwen3_5
from tests.tiny_qwen_vl_models import make_tiny_qwen2_5_vl, make_tiny_qwen3_5_vision, make_tiny_qwen3_vl
from tests.tiny_vision_models import (
    make_tiny_gemma3_vision,
    make_tiny_gemma4_vision,
    make_tiny_idefics3,
    make_tiny_llava,
)

pytestmark = pytest.mark.slow  # worker processes and servers

STREAMS = 16
TWO_WORKERS = """
name: two_workers
model: {model}
transport: ipc
restart: {{backoff_base_s: 0.1, jitter: 0.0}}
nodes:
  source: {{op: prompt_source}}
  admission: {{op: admission}}
  sort: {{op: policy_sort}}
  route: {{op: route, params: {{strategy: round_robin}}}}
  engine_a: {{op: engine, placement: process}}
  engine_b: {{op: engine, placement: process}}
  metrics: {{op: metrics_sink}}
edges:
  - source -> admission -> sort -> route -> [engine_a, engine_b]
  - engine_a -> metrics
  - engine_b -> metrics
"""
ONE_WORKER = """
name: one_worker
model: {model}
transport: ipc
nodes:
  source: {{op: prompt_source}}
  admission: {{op: admission}}
  engine_a: {{op: engine, placement: process}}
  metrics: {{op: metrics_sink}}
edges:
  - source -> admission -> engine_a -> metrics
"""


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("failover") / "llama", max_position_embeddings=4096)


def sse_events(url: str, body: dict) -> Iterator[dict]:
    """A streamed completion's events (data lines); a refused request's error body as its one event."""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=REPLY_TIMEOUT_S) as reply:
        if reply.status_code != 200:
            yield json.loads(reply.read())
            return
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line.removeprefix("data: "))


Step = tuple[str, dict[str, float]]  # a token and its top two's logprobs, by their text
TIE = 5e-3  # logprobs this close are a tie that fp32 rounding in another batch's shapes may break either way


def stream(url: str, index: int, outcomes: dict[int, list[str]], texts: dict[int, list[Step]]) -> None:
    """One greedy streamed completion: its tokens with their top two, and what ended it ("length" or the error's
    code) once per end."""
    body = {"prompt": f"stream {index}", "max_tokens": 300, "min_tokens": 300, "ignore_eos": True, "temperature": 0,
            "logprobs": 2}  # fmt: skip
    ends, texts[index] = outcomes.setdefault(index, []), []
    for event in sse_events(url, body):
        if "error" in event:
            ends.append(event["error"]["code"])
            continue
        choice = event["choices"][0]
        if choice["logprobs"]:
            texts[index] += zip(choice["logprobs"]["tokens"], choice["logprobs"]["top_logprobs"], strict=True)
        if choice["finish_reason"]:
            ends.append(choice["finish_reason"])


def assert_resumed_as_uninterrupted(resumed: dict[int, list[Step]], reference: dict[int, list[Step]]) -> None:
    """Every resumed stream's tokens are the uninterrupted run's. Greedy decoding is exact up to fp32 rounding,
    which a resumed stream's prefill (its tokens so far at once, beside other requests) does in another order than
    the steps that decoded them: where the uninterrupted run's top two tie within TIE, either may be chosen and the
    streams part there. A resume that lost its place parts where the two are far apart."""
    for i in range(STREAMS):
        assert len(resumed[i]) == len(reference[i]) == 300, f"stream {i} has {len(resumed[i])} tokens"
        for position, ((token, _), (expected, top)) in enumerate(zip(resumed[i], reference[i], strict=True)):
            if token != expected:
                gap = top[expected] - top.get(token, -float("inf"))
                assert gap < TIE, f"stream {i} differs at token {position}: {token!r} for {expected!r} ({top})"
                break


def wait_for_streams_midway(texts: dict[int, str], outcomes: dict[int, list[str]], more_than: int) -> None:
    """Until more than `more_than` streams have tokens and no end: round robin put half the streams on each worker,
    so then at least one stream on either worker is mid-stream, whichever of them a test kills."""
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while sum(bool(text) and not outcomes.get(i) for i, text in list(texts.items())) <= more_than:
        assert time.monotonic() < deadline, "the streams did not get going"
        time.sleep(0.005)


def streams_across_a_kill(gw, one_stream) -> tuple[dict[int, str], dict[int, list[str]]]:
    """STREAMS streams, each `one_stream(index, outcomes, texts)` in a thread of its own; engine_a's worker killed
    (SIGKILL) once more than half of them are midway. Every stream's text and ends, once all are over."""
    texts: dict[int, str] = {}
    outcomes: dict[int, list[str]] = {}
    threads = [threading.Thread(target=one_stream, args=(i, outcomes, texts)) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    wait_for_streams_midway(texts, outcomes, more_than=STREAMS // 2)
    os.kill(gw.core.executor.pids["engine_a"], signal.SIGKILL)
    for thread in threads:
        thread.join(REPLY_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads), "a stream hung"
    return texts, outcomes


def retries(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(url + "/metrics").text
    found = re.findall(r'^sagellm:request_retries_total\{code="(\w+)",resumed="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {(code, resumed): float(count) for code, resumed, count in found}


def reference_streams(url: str, one_stream=None) -> dict[int, list[Step]]:
    """Each stream again, uninterrupted, all at once (the reference a resumed stream must equal)."""
    one_stream = one_stream or functools.partial(stream, url)
    steps: dict[int, list[Step]] = {}
    with ThreadPoolExecutor(STREAMS) as pool:
        list(pool.map(lambda i: one_stream(i, {}, steps), range(STREAMS)))
    return steps


def test_streams_on_a_killed_worker_resume_on_the_other_with_the_same_text(long_model, tmp_path):
    graph = tmp_path / "two.yaml"
    graph.write_text(TWO_WORKERS.format(model=long_model))
    with running_gateway(graph, tiny_config(tmp_path)) as gw:
        texts, outcomes = streams_across_a_kill(gw, functools.partial(stream, gw.url))
        assert outcomes == {i: ["length"] for i in range(STREAMS)}  # every stream finished, once
        resumed = retries(gw.url).get(("instance_lost", "true"), 0)
        assert resumed >= 1
        assert_resumed_as_uninterrupted(texts, reference_streams(gw.url))


def _tiny_gpt_oss(directory: Path) -> Path:
    rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "original_max_position_embeddings": 1024}
    return make_tiny_gpt_oss(directory, max_position_embeddings=4096, rope_parameters=rope)


@pytest.mark.parametrize("make_model", [_tiny_gpt_oss, functools.partial(make_tiny_qwen3_5,
                         max_position_embeddings=4096), functools.partial(make_tiny_gemma4,
                         max_position_embeddings=4096)], ids=["gpt_oss", "qwen3_5", "gemma4"])  # fmt: skip
def test_newer_architectures_streams_on_a_killed_worker_resume_with_the_same_text(make_model, tmp_path):
    """The same with gpt-oss's layer (attention sinks, alternating sliding windows, experts with biases), with
    Qwen3.5's (Gated DeltaNet layers) and with Gemma 4's (per-layer embeddings, shared KV): the resumed streams'
    prompts plus tokens so far are prefilled again, over windows they have long passed, and through recurrent states
    rebuilt from position 0."""
    model = make_model(tmp_path / "model")
    graph = tmp_path / "two.yaml"
    graph.write_text(TWO_WORKERS.format(model=model))
    with running_gateway(graph, tiny_config(tmp_path)) as gw:
        texts, outcomes = streams_across_a_kill(gw, functools.partial(stream, gw.url))
        assert outcomes == {i: ["length"] for i in range(STREAMS)}
        assert retries(gw.url).get(("instance_lost", "true"), 0) >= 1
        assert_resumed_as_uninterrupted(texts, reference_streams(gw.url))


def choices_stream(
    url: str, by_choice: dict[int, list[str]], index: int, outcomes: dict[int, list[str]], texts: dict[int, str]
) -> None:
    """One streamed completion of 4 seeded sampled choices: each choice's text (`by_choice`), all of them in
    `texts`, and what ended each choice."""
    body = {"prompt": f"choices {index}", "max_tokens": 240, "min_tokens": 240, "ignore_eos": True,
            "temperature": 1.0, "seed": index, "n": 4}  # fmt: skip
    ends: list[str] = []  # given to `outcomes` once the stream is over: midway until then
    texts[index], by_choice[index] = "", [""] * 4
    for event in sse_events(url, body):
        if "error" in event:
            ends.append(event["error"]["code"])
            continue
        for choice in event["choices"]:
            by_choice[index][choice["index"]] += choice["text"]
            texts[index] += choice["text"]
            if choice["finish_reason"]:
                ends.append(choice["finish_reason"])
    outcomes[index] = ends


def test_sampled_choices_on_a_killed_worker_resume_each_with_its_own_tokens(long_model, tmp_path):
    graph = tmp_path / "two.yaml"
    graph.write_text(TWO_WORKERS.format(model=long_model))
    # Room for every choice at once (16 streams x 4 = 32 sequences a worker): with the default 16, half the streams
    # queue behind the others, and more than half of them are midway at once only by the luck of timing.
    room = {f"{engine}.max_num_seqs": 32 for engine in ("engine_a", "engine_b")}
    with running_gateway(graph, tiny_config(tmp_path), **room) as gw:
        by_choice: dict[int, list[str]] = {}
        texts, outcomes = streams_across_a_kill(gw, functools.partial(choices_stream, gw.url, by_choice))
        assert outcomes == {i: ["length"] * 4 for i in range(STREAMS)}  # every choice ended, once
        assert retries(gw.url).get(("instance_lost", "true"), 0) >= 1
        for i in range(STREAMS):  # the reference: the same request again, uninterrupted
            body = {"prompt": f"choices {i}", "max_tokens": 240, "min_tokens": 240, "ignore_eos": True,
                    "temperature": 1.0, "seed": i, "n": 4}  # fmt: skip
            again = httpx.post(gw.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S).json()
            assert by_choice[i] == [c["text"] for c in again["choices"]], f"request {i} differs after its resume"


WORDS = ("alpha", "beta", "gamma", "delta")
WORDS_SCHEMA = {  # a long reply the grammar must end: 40 words, each one of four
    "type": "object",
    "properties": {"words": {"type": "array", "items": {"enum": list(WORDS)}, "minItems": 40, "maxItems": 40}},
    "required": ["words"],
    "additionalProperties": False,
}
WORDS_FORMAT = {"type": "json_schema", "json_schema": {"name": "words", "schema": WORDS_SCHEMA, "strict": True}}


def constrained_chat(sdk: openai.OpenAI, index: int, outcomes: dict[int, list[str]], texts: dict[int, str]) -> None:
    """One greedy chat streamed through the openai SDK, its reply constrained to WORDS_SCHEMA: its text, and what
    ended it once per end."""
    ends, texts[index] = outcomes.setdefault(index, []), ""
    try:
        chunks = sdk.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"words {index}"}], response_format=WORDS_FORMAT,
            temperature=0, max_tokens=400, stream=True,
        )  # fmt: skip
        for chunk in chunks:
            texts[index] += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            if chunk.choices and chunk.choices[0].finish_reason:
                ends.append(chunk.choices[0].finish_reason)
    except openai.APIError as error:
        ends.append(f"error: {error}")


def test_constrained_streams_on_a_killed_worker_resume_and_still_follow_their_schema(long_model, tmp_path):
    graph = tmp_path / "two.yaml"
    graph.write_text(TWO_WORKERS.format(model=long_model))
    with running_gateway(graph, tiny_config(tmp_path, served_model_name="tiny")) as gw:
        sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=REPLY_TIMEOUT_S)
        texts, outcomes = streams_across_a_kill(gw, functools.partial(constrained_chat, sdk))
        assert outcomes == {i: ["stop"] for i in range(STREAMS)}  # every stream ended once, its grammar complete
        assert retries(gw.url).get(("instance_lost", "true"), 0) >= 1
        for i in range(STREAMS):
            words = json.loads(texts[i])["words"]
            assert len(words) == 40 and set(words) <= set(WORDS), texts[i]
            again = sdk.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"words {i}"}], response_format=WORDS_FORMAT,
                temperature=0, max_tokens=400,
            )  # fmt: skip
            assert texts[i] == again.choices[0].message.content, f"stream {i} differs after its resume"


def test_requests_for_a_server_gone_between_health_checks_go_to_the_other(long_model, tmp_path):
    with (
        running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path / "front", allowed_upstreams=LOCAL_UPSTREAMS),
                        long_model) as gw,
        running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path / "a", served_model_name="upstream"),
                        long_model) as first,
        running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path / "b", served_model_name="upstream"),
                        long_model) as second,
    ):  # fmt: skip
        headers = {"authorization": f"Bearer {gw.gateway.admin_key}"}
        with httpx.Client(base_url=gw.url, headers=headers, timeout=60) as admin:
            attach(admin, first.url, "pool")
            attach(admin, second.url, "pool")
        first.stop()  # gone; the gateway's next health check is seconds away
        body = {"model": "pool", "prompt": "hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: httpx.post(gw.url + "/v1/completions", json=body, timeout=60), range(8)))
        assert [r.status_code for r in replies] == [200] * 8
        assert len({r.json()["choices"][0]["text"] for r in replies}) == 1
        assert retries(gw.url).get(("unavailable", "false"), 0) >= 1


def stream_until_first_token(url: str, body: dict, first: threading.Event, events: list[dict]) -> None:
    """A streamed completion's events (data lines), `first` set at its first token."""
    for event in sse_events(url, body):
        events.append(event)
        first.set()


def test_no_token_in_time_is_a_timeout_once_nothing_is_left_to_try(long_model, tmp_path):
    """The only engine worker is stopped (SIGSTOP, well within the 10 s it may be silent before it counts as lost):
    before a request, its attempt and the retry each give no first token in time (HTTP 504); after a stream's first
    token, the next one does not come in time and the retry gives no first token (an error event ends the stream)."""
    graph = tmp_path / "one.yaml"
    graph.write_text(ONE_WORKER.format(model=long_model))
    failover = FailoverPolicy(max_retries=1, retry_wait_s=1, first_token_timeout_s=0.5, token_timeout_s=0.5)
    body = {"prompt": "hello", "max_tokens": 2000, "ignore_eos": True}
    with running_gateway(graph, tiny_config(tmp_path, failover=failover)) as gw:
        worker = gw.core.executor.pids["engine_a"]
        os.kill(worker, signal.SIGSTOP)
        try:
            reply = httpx.post(gw.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S)
        finally:
            os.kill(worker, signal.SIGCONT)
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
        assert re.fullmatch(r"no first token( from \w+)? within 0.5 s", reply.json()["error"]["message"])
        assert retries(gw.url) == {("timeout", "false"): 1}

        first, events = threading.Event(), []
        streaming = threading.Thread(target=stream_until_first_token, args=(gw.url, body, first, events))
        streaming.start()
        assert first.wait(REPLY_TIMEOUT_S)
        os.kill(worker, signal.SIGSTOP)
        try:
            streaming.join(REPLY_TIMEOUT_S)
        finally:
            os.kill(worker, signal.SIGCONT)
        assert not streaming.is_alive(), "the stream hung"
        assert events[-1]["error"]["code"] == "timeout" and "error" not in events[0]
        assert retries(gw.url) == {("timeout", "false"): 1, ("timeout", "true"): 1}

        too_short = httpx.post(gw.url + "/v1/completions", json={**body, "token_timeout": 0.5}, timeout=REPLY_TIMEOUT_S)
        assert too_short.status_code == 400 and too_short.json()["error"]["param"] == "token_timeout"
        own = {**body, "max_tokens": 4, "first_token_timeout": 30}  # a request's own timeout replaces the gateway's
        assert httpx.post(gw.url + "/v1/completions", json=own, timeout=60).status_code == 200
        deadline = time.monotonic() + 10  # an abandoned attempt ends as its cancellation reaches the engine
        while gw.core.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gw.core.in_flight == 0  # the abandoned attempts left nothing behind


def media_stream(
    url: str, part: dict, index: int, outcomes: dict[int, list[str]], texts: dict[int, list[Step]]
) -> None:
    """`stream`'s greedy stream as a chat about an image or a clip (`part`): its prompt holds the placeholders."""
    content = [part, {"type": "text", "text": f"stream {index}"}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 300, "min_tokens": 300,
            "ignore_eos": True, "temperature": 0, "stream": True, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    ends, texts[index] = outcomes.setdefault(index, []), []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=REPLY_TIMEOUT_S) as reply:
        if reply.status_code != 200:
            ends.append(json.loads(reply.read())["error"]["code"])
            return
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                ends.append(event["error"]["code"])
                continue
            choice = event["choices"][0]
            for step in (choice.get("logprobs") or {}).get("content") or []:
                texts[index].append((step["token"], {top["token"]: top["logprob"] for top in step["top_logprobs"]}))
            if choice["finish_reason"]:
                ends.append(choice["finish_reason"])


def _image_part() -> dict:
    pixels = io.BytesIO()
    Image.effect_noise((37, 23), 60).convert("RGB").save(pixels, "PNG")
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(pixels.getvalue()).decode()},
    }


def _audio_part() -> dict:
    clip = io.BytesIO()
    with wave.open(clip, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(16000)
        file.writeframes((np.random.default_rng(5).standard_normal(19000) * 3000).astype("<i2").tobytes())
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip.getvalue()).decode(), "format": "wav"}}


@pytest.mark.parametrize(
    ("make_model", "make_part"),
    [
        (make_tiny_llava, _image_part),
        (make_tiny_gemma3_vision, _image_part),
        (make_tiny_gemma4_vision, _image_part),
        (make_tiny_idefics3, _image_part),
        (make_tiny_qwen3_5_vision, _image_part),
        (make_tiny_qwen2_5_vl, _image_part),
        (make_tiny_qwen3_vl, _image_part),
        (make_tiny_qwen2_audio, _audio_part),
    ],
    ids=[
        "image",
        "gemma3-image",
        "gemma4-image",
        "idefics3-image",
        "qwen3_5-image",
        "qwen2_5_vl-image",
        "qwen3_vl-image",
        "audio",
    ],
)
def test_streams_about_an_image_or_a_clip_on_a_killed_worker_resume_with_the_same_text(make_model, make_part, tmp_path):
    """A chat about an image (or an audio clip) resumed on the other worker: its prompt (the placeholders expanded
    there again, the image encoded again; Gemma 3's soft tokens attending both ways again; Qwen3.5's text after the
    picture at the positions its grid shifted, Qwen3-VL's DeepStack rows again) plus its tokens so far,
    prefilled anew, continue as the uninterrupted stream does."""
    model = make_model(tmp_path / "model", text_settings={"max_position_embeddings": 4096})
    graph = tmp_path / "two.yaml"
    graph.write_text(TWO_WORKERS.format(model=model))
    part = make_part()
    with running_gateway(graph, tiny_config(tmp_path)) as gw:
        texts, outcomes = streams_across_a_kill(gw, functools.partial(media_stream, gw.url, part))
        assert outcomes == {i: ["length"] for i in range(STREAMS)}
        assert retries(gw.url).get(("instance_lost", "true"), 0) >= 1
        assert_resumed_as_uninterrupted(texts, reference_streams(gw.url, functools.partial(media_stream, gw.url, part)))
