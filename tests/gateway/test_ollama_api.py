"""Ollama's API through the official `ollama` Python library, unchanged, against a gateway serving a tiny llama and a
tiny sentence-transformers model: list, show and ps describe them; a chat whole and streamed says the same (NDJSON
lines, the last with Ollama's counts and durations); a templated generate is the chat of its prompt and a raw one the
completion of it; embed equals /v1/embeddings; a `format` schema is followed; a tool round trip is taken and a tool
call written in Ollama's shape; errors in Ollama's shape and status; `keep_alive` loads and unloads a model on
demand (0: unloaded once its request is done, as `ollama stop` asks); a pull downloads a model on demand from a Hub
double, its progress in Ollama's lines."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import numpy
import ollama
import pytest

from sagellm.gateway.config import ModelsOnDemand
from sagellm.gateway.ollama.cards import gguf_file_of, gguf_file_type
from sagellm.gateway.ollama.replies import ChatLines
from sagellm.gateway.replies.choice import Choice
from sagellm.gateway.replies.events import ToolCall
from tests.embedding.conftest import make_tiny_bert, write_sentence_transformers_files
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, sdk_client, tiny_config
from tests.hub_double import hub_double
from tests.tiny_models import make_tiny_llama, write_tiny_gguf

pytestmark = pytest.mark.slow

EMBEDDER = "tiny-st"
PULLED_REPO = "org/tiny-pulled"
GREEDY = {"temperature": 0, "num_predict": 8}
ASK = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A tiny llama with room for the fallback template's tools (~600 tokens), and a tiny embedding model."""
    llama = make_tiny_llama(tmp_path_factory.mktemp("ollama") / "tiny-llama", max_position_embeddings=1024)
    bert = write_sentence_transformers_files(make_tiny_bert(tmp_path_factory.mktemp("bert") / EMBEDDER))
    config = tiny_config(tmp_path_factory.mktemp("ollama"), embedding_model=str(bert))
    with running_gateway(GRAPHS / "colocated.yaml", config, llama) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway) -> ollama.Client:
    return ollama.Client(host=gateway.url, timeout=REPLY_TIMEOUT_S)


def test_list_show_and_ps_describe_the_served_models(gateway, client) -> None:
    model = gateway.core.model_name
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {f"{model}:latest", f"{EMBEDDER}:latest"}
    details = listed[f"{model}:latest"].details
    assert details.family == "llama" and details.families == ["llama"] and details.parameter_size.endswith("M")
    assert listed[f"{model}:latest"].size > 0 and len(listed[f"{model}:latest"].digest) == 64
    shown = client.show(f"{model}:latest")  # a client's NAME:TAG is the model's own name
    assert shown.capabilities == ["completion", "tools"]  # ChatML: given tools by the fallback template
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == gateway.core.max_model_len
    assert shown.template and shown.details.family == "llama"
    assert client.show(EMBEDDER).capabilities == ["embedding"]
    running = {m.model: m for m in client.ps().models}
    assert set(running) == set(listed) and running[f"{model}:latest"].context_length == gateway.core.max_model_len


def test_a_chat_whole_and_streamed_says_the_same(gateway, client) -> None:
    model = gateway.core.model_name
    whole = client.chat(model=model, messages=ASK, options=GREEDY, stream=False)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 8
    assert whole.prompt_eval_count > 0 and whole.total_duration >= whole.eval_duration > 0
    assert whole.message.role == "assistant"
    parts = list(client.chat(model=model, messages=ASK, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == 8 and parts[-1].done_reason == "length"


def test_the_stream_is_ndjson_lines(gateway) -> None:
    body = {"model": gateway.core.model_name, "messages": ASK, "options": GREEDY}  # Ollama streams by default
    with httpx.stream("POST", gateway.url + "/api/chat", json=body, timeout=REPLY_TIMEOUT_S) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in reply.iter_lines() if line]
    assert all(line["model"] == gateway.core.model_name and line["created_at"].endswith("Z") for line in lines)
    last = lines[-1]
    assert last["done"] and {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                             "eval_count", "eval_duration"} <= set(last)  # fmt: skip


def test_generate_is_the_chat_of_its_prompt_and_raw_the_completion(gateway, client) -> None:
    model = gateway.core.model_name
    prompt = "Tell me about the sea."
    generated = client.generate(model=model, prompt=prompt, system="Be brief.", options=GREEDY)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    assert generated.response == client.chat(model=model, messages=chat, options=GREEDY).message.content
    streamed = "".join(p.response for p in client.generate(model=model, prompt=prompt, system="Be brief.",
                                                         options=GREEDY, stream=True))  # fmt: skip
    assert streamed == generated.response
    raw = client.generate(model=model, prompt=prompt, raw=True, options=GREEDY)
    completion = sdk_client(gateway).completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert raw.response == completion.choices[0].text and raw.eval_count == 8
    loaded = client.generate(model=model)  # an empty generate loads the model
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_embed_is_v1_embeddings(gateway, client) -> None:
    texts = ["the cat sat", "on the mat"]
    embedded = client.embed(model=f"{EMBEDDER}:latest", input=texts)
    reference = sdk_client(gateway).embeddings.create(model=EMBEDDER, input=texts)
    # the same vectors, to fp32's rounding as the engine batches them
    assert numpy.allclose(embedded.embeddings, [item.embedding for item in reference.data], atol=1e-6)
    assert embedded.prompt_eval_count == reference.usage.prompt_tokens
    one = client.embeddings(model=EMBEDDER, prompt="the cat sat").embedding
    assert numpy.allclose(one, embedded.embeddings[0], atol=1e-6)


def test_embed_cuts_a_long_input_unless_told_not_to(gateway, client) -> None:
    from transformers import AutoTokenizer

    text = " ".join(["the quick brown fox"] * 20)  # ~80 tokens, past the model's 24 (MAX_SEQ_LENGTH)
    cut = AutoTokenizer.from_pretrained(gateway.core.embedder(EMBEDDER).model)(text, truncation=True, max_length=24)
    embedded = client.embed(model=EMBEDDER, input=[text, "the cat"])  # Ollama's default: truncate
    reference = sdk_client(gateway).embeddings.create(model=EMBEDDER, input=[cut.input_ids])
    assert numpy.allclose(embedded.embeddings[0], reference.data[0].embedding, atol=1e-6)
    assert embedded.prompt_eval_count == 24 + client.embed(model=EMBEDDER, input="the cat").prompt_eval_count
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model=EMBEDDER, input=text, truncate=False)
    assert refused.value.status_code == 400 and "more than this model's limit of 24" in refused.value.error


def test_a_format_schema_is_followed(gateway, client) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
    reply = client.chat(model=gateway.core.model_name, messages=ASK, format=schema,
                        options={"temperature": 0.7, "num_predict": 60})  # fmt: skip
    jsonschema.validate(json.loads(reply.message.content), schema)
    anything = client.chat(model=gateway.core.model_name, messages=ASK, format="json", options={"num_predict": 60})
    assert isinstance(json.loads(anything.message.content), dict)


def test_a_tool_round_trip_is_taken(gateway, client) -> None:
    def get_weather(city: str) -> str:
        """Get the weather in a city.

        Args:
          city: the city's name
        """
        return "sunny"

    asked = [{"role": "user", "content": "Weather in Paris?"}]
    called = {"role": "assistant", "content": "",
              "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}  # fmt: skip
    answered = {"role": "tool", "tool_name": "get_weather", "content": "sunny"}
    model = gateway.core.model_name
    bare = client.chat(model=model, messages=asked, tools=[get_weather], options=GREEDY)
    rounded = client.chat(model=model, messages=[*asked, called, answered], tools=[get_weather], options=GREEDY)
    assert rounded.prompt_eval_count > bare.prompt_eval_count  # the call and its result are in the prompt
    assert rounded.done and rounded.message.role == "assistant"


def test_a_tool_call_is_written_as_ollama_reads_it() -> None:
    """The reader's calls (the chat's own tool parsing, tested with each API) as Ollama's message holds them: the
    arguments an object, parsed by the ollama library's own types."""
    call = ToolCall(name="get_weather", arguments='{"city": "Paris"}')
    body = ChatLines("m").whole(Choice(0, finish_reason="stop"), None, None, [call])
    reply = ollama.ChatResponse.model_validate(body)
    assert reply.message.tool_calls[0].function.name == "get_weather"
    assert reply.message.tool_calls[0].function.arguments == {"city": "Paris"} and reply.done_reason == "stop"
    (line,) = ChatLines("m").call(call)
    assert ollama.ChatResponse.model_validate(line).message.tool_calls[0].function.arguments == {"city": "Paris"}


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "nope", "messages": ASK}, 404, "model 'nope' not found"),
        ({"messages": ASK, "options": {"mirostat": 2}}, 400, "options.mirostat: mirostat sampling is not implemented"),
        ({"messages": ASK, "options": {"num_predict": 0}}, 400, "options.num_predict"),
        ({"messages": ASK, "options": {"no_such": 1}}, 400, "options.no_such: not an option Ollama takes"),
        ({"messages": ASK, "format": "yaml"}, 400, "format:"),
        ({"messages": ASK, "unknown": 1}, 400, "unknown"),
        ({"messages": ASK, "logprobs": True}, 400, "logprobs: not served on Ollama's routes yet"),
        ({"messages": [], "keep_alive": 0}, 400, "keep_alive: 0 unloads a model loaded on demand;"),
        ({"messages": ASK, "keep_alive": "forever"}, 400, "keep_alive: seconds or a duration"),
        ({"messages": ASK, "options": {"temperature": "hot"}}, 400, "options.temperature: Expected `float`"),
        ({"messages": ASK, "think": True}, 400, "does not support thinking"),
    ],
    ids=[
        "model",
        "mirostat",
        "num_predict",
        "option",
        "format",
        "field",
        "logprobs",
        "unload",
        "keep_alive",
        "option-type",
        "think",
    ],  # fmt: skip
)
def test_errors_are_ollamas(gateway, body, status, words) -> None:
    reply = httpx.post(gateway.url + "/api/chat", json={"model": gateway.core.model_name, **body},
                       timeout=REPLY_TIMEOUT_S)  # fmt: skip
    assert reply.status_code == status and words in reply.json()["error"], reply.text
    assert set(reply.json()) == {"error"}


def test_open_webuis_requests_are_served(gateway, client) -> None:
    """What Open WebUI 0.12 sends through its Ollama connection beside the plain chat (checked against it by hand):
    its chat settings as options (logit_bias, reasoning_effort where the model takes it), the `:latest` name on the
    OpenAI routes its `/ollama/v1` proxy forwards, a pull of a model served here."""
    model = gateway.core.model_name
    biased = client.chat(model=model, messages=ASK, options={**GREEDY, "logit_bias": {"42": 100.0}})
    assert biased.eval_count == 8
    tagged = sdk_client(gateway).chat.completions.create(model=f"{model}:latest", messages=ASK, max_tokens=4)
    assert tagged.choices[0].message.content is not None
    assert client.pull(f"{model}:latest").status == "success"
    assert [p.status for p in client.pull(model, stream=True)] == ["pulling manifest", "success"]
    with pytest.raises(ollama.ResponseError) as missing:
        client.pull("llama3.2")
    assert missing.value.status_code == 404 and "is not served here yet" in missing.value.error
    created = httpx.post(gateway.url + "/api/create", json={"model": "x", "from": model}, timeout=REPLY_TIMEOUT_S)
    assert created.status_code == 404 and "POST /api/create is not served here" in created.json()["error"]


def test_load_options_are_taken_and_the_version_is_answered(gateway, client) -> None:
    options = {**GREEDY, "num_ctx": 4096, "num_thread": 2, "num_gpu": 0, "use_mmap": True}  # Open WebUI sends these
    assert client.chat(model=gateway.core.model_name, messages=ASK, options=options, keep_alive="5m").done
    assert httpx.get(gateway.url + "/api/version").json()["version"].count(".") == 2
    assert httpx.head(gateway.url + "/").status_code == 200  # the CLI's heartbeat


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub double serving a tiny llama as PULLED_REPO."""
    with hub_double(PULLED_REPO, make_tiny_llama(tmp_path_factory.mktemp("hub") / "tiny")) as double:
        yield double


@pytest.fixture(scope="module")
def on_demand(tiny_model, hub, tmp_path_factory):
    """A gateway whose models are loaded on demand (`sagellm serve --model tiny=...`), never unloaded for idling: a
    directory, a Hub id the Hub double serves and one it does not, the cache in a home of the test's own."""
    sources = {"tiny": str(tiny_model), "pulled": PULLED_REPO, "missing": "org/not-on-the-hub"}
    models = ModelsOnDemand(sources, engine={"kv_cache_memory_gb": 0.05}, idle_unload_s=600)
    config = tiny_config(tmp_path_factory.mktemp("ollama-on-demand"), models_on_demand=models)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", hub.url)
        patch.setenv("SAGELLM_HOME", str(tmp_path_factory.mktemp("home")))
        with running_gateway(GRAPHS / "control_plane.yaml", config) as gw:
            yield gw


def _running(gateway) -> list[str]:
    return [m["model"] for m in httpx.get(gateway.url + "/api/ps", timeout=REPLY_TIMEOUT_S).json()["models"]]


def _until_unloaded(gateway, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _running(gateway):
        assert time.monotonic() < deadline, "the model is still loaded"
        time.sleep(0.2)


def test_keep_alive_loads_and_unloads_a_model_on_demand(on_demand) -> None:
    client = ollama.Client(host=on_demand.url, timeout=REPLY_TIMEOUT_S * 3)
    assert _running(on_demand) == []
    loaded = client.generate(model="tiny", keep_alive="10m")  # an empty generate loads it
    assert loaded.done_reason == "load" and _running(on_demand) == ["tiny:latest"]
    reply = client.chat(model="tiny:latest", messages=ASK, options=GREEDY, keep_alive=0)  # served, then unloaded
    assert reply.done and reply.eval_count == 8
    _until_unloaded(on_demand)
    client.generate(model="tiny")
    assert _running(on_demand) == ["tiny:latest"]
    stopped = client.generate(model="tiny", keep_alive=0)  # what `ollama stop tiny` sends
    assert stopped.done_reason == "unload"
    _until_unloaded(on_demand)


def test_pull_downloads_a_model_on_demand_file_by_file_and_it_then_chats(on_demand, hub) -> None:
    """`ollama pull`: each file's line (digest, total, completed) as Ollama's layers', then success; pulled again,
    nothing is fetched; the model then loads from the cache. A model the Hub lacks ends its pull with an error."""
    client = ollama.Client(host=on_demand.url, timeout=REPLY_TIMEOUT_S * 3)
    lines = list(client.pull("pulled", stream=True))
    assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
    last = {line.status.removeprefix("pulling "): line for line in lines[1:-1]}
    assert sorted(last) == sorted(hub.requests) and len(hub.requests) >= 4  # config, weights, tokenizer, template
    assert all(line.completed == line.total > 0 for line in last.values())
    weights = next(line for name, line in last.items() if name.endswith(".safetensors"))
    assert weights.digest.startswith("sha256:") and len(weights.digest) == 7 + 64
    fetched = len(hub.requests)
    assert client.pull("pulled", stream=False).status == "success" and len(hub.requests) == fetched
    reply = client.chat(model="pulled", messages=ASK, options=GREEDY, keep_alive=0)
    assert reply.done and reply.eval_count == 8 and len(hub.requests) == fetched  # loaded from the cache
    _until_unloaded(on_demand)
    with pytest.raises(ollama.ResponseError, match="org/not-on-the-hub: download from the Hugging Face Hub failed"):
        list(client.pull("missing", stream=True))
    with pytest.raises(ollama.ResponseError) as whole:
        client.pull("missing", stream=False)
    assert whole.value.status_code == 502


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q8_0"])
def test_a_ggufs_quantization_is_named_as_ollama_names_it(tmp_path, qtype) -> None:
    """From its `general.file_type` (Q4_K_M), else its weights' kind (a file written without one): in the cache's
    directory of the file as for the file itself."""
    hf_dir = make_tiny_llama(tmp_path / "llama", hidden_size=256, intermediate_size=512)
    (tmp_path / "cached").mkdir()
    path = write_tiny_gguf(tmp_path / "cached" / f"llama.{qtype}.gguf", hf_dir, qtype)
    assert gguf_file_type(str(gguf_file_of(path.parent))) == gguf_file_type(str(path)) == qtype
    assert gguf_file_of(hf_dir) is None  # a checkpoint of safetensors
