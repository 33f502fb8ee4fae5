"""One set of defaults: `LLM`, a graph's sources and the gateway fill what a request leaves out the same way, from
the model's own generation config, else SamplingParams' (vLLM's, with no `max_tokens` bound but the context)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from sagellm import LLM, SamplingParams
from sagellm.dsl import Environment
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.sampling_defaults import from_gguf_metadata
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama, write_tiny_gguf

PROMPT = "hello world"
REPLY_TOKENS = 6  # the model's max_new_tokens


@pytest.fixture(scope="module")
def greedy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose makers recommend greedy replies of 6 tokens (and a do_sample our sampler has no use for)."""
    model = make_tiny_llama(tmp_path_factory.mktemp("defaults") / "greedy-llama")
    generation = json.loads((model / "generation_config.json").read_text())
    generation |= {"temperature": 0.0, "top_k": 20, "max_new_tokens": REPLY_TOKENS, "do_sample": False}
    (model / "generation_config.json").write_text(json.dumps(generation))
    return model


@pytest.fixture(scope="module")
def llm(greedy_model: Path) -> LLM:
    return LLM(str(greedy_model), max_model_len=128)


def test_the_model_s_generation_config_is_read_under_our_names(greedy_model: Path) -> None:
    loaded = load_model(greedy_model, load_weights=False)
    assert loaded.sampling_defaults == {"temperature": 0.0, "top_k": 20, "max_tokens": REPLY_TOKENS}


def test_gguf_files_say_it_in_llama_cpp_s_keys(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "t.gguf", make_tiny_llama(tmp_path / "hf"), sampling={"temp": 0.5, "top_k": 40})
    assert load_model(gguf, load_weights=False).sampling_defaults == {"temperature": 0.5, "top_k": 40}
    assert from_gguf_metadata({"general.name": "x", "general.sampling.top_p": 0.95}) == {"top_p": 0.95}


def test_a_generation_config_beside_a_gguf_is_read_and_a_broken_one_named(tmp_path: Path) -> None:
    model = tmp_path / "gguf-model"
    model.mkdir()
    write_tiny_gguf(model / "tiny.gguf", make_tiny_llama(tmp_path / "hf"))
    assert load_model(model, load_weights=False).sampling_defaults == {}
    (model / "generation_config.json").write_text('{"temperature": 0.4, "top_p": 0.9}')
    assert load_model(model, load_weights=False).sampling_defaults == {"temperature": 0.4, "top_p": 0.9}
    (model / "generation_config.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match=r"generation_config\.json: unreadable JSON"):
        load_model(model, load_weights=False)


def test_llm_without_params_uses_the_model_s_defaults(llm: LLM) -> None:
    out = llm.generate(PROMPT)[0].outputs[0]
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=REPLY_TOKENS))[0].outputs[0]
    assert out.token_ids == greedy.token_ids and len(out.token_ids) == REPLY_TOKENS
    assert llm.default_sampling_params() == SamplingParams(temperature=0.0, top_k=20, max_tokens=REPLY_TOKENS)


def test_a_model_that_says_nothing_samples_up_to_the_context(tmp_path: Path) -> None:
    llm = LLM(str(make_tiny_llama(tmp_path / "plain")), max_model_len=64)
    params = llm.default_sampling_params()
    assert (params.temperature, params.max_tokens) == (1.0, None)
    out = llm.generate([1, 2, 3], SamplingParams(ignore_eos=True))[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (64 - 3, "length")  # the context is the only bound


def test_a_graph_s_source_uses_the_model_s_defaults(greedy_model: Path, llm: LLM, tmp_path: Path) -> None:
    env = Environment("defaults", model=str(greedy_model))
    source = env.from_source("prompt_source", prompts=[PROMPT], chat=False)
    source.map("admission").map("route").map("engine", max_model_len=128).sink("jsonl_sink", path=str(tmp_path / "o"))
    env.execute()
    (reply,) = [json.loads(line) for line in (tmp_path / "o").read_text().splitlines()]
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=REPLY_TOKENS))[0].outputs[0]
    assert reply["token_ids"] == greedy.token_ids


@pytest.mark.slow
def test_the_gateway_uses_the_model_s_defaults_and_openai_s_16_for_completions(
    greedy_model: Path, llm: LLM, tmp_path: Path
) -> None:
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path), greedy_model) as gw:
        client = httpx.Client(base_url=gw.url, timeout=REPLY_TIMEOUT_S)
        body = {"prompt": PROMPT, "ignore_eos": True, "return_token_ids": True}
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
        chat = {"messages": [{"role": "user", "content": PROMPT}], "return_token_ids": True}
        reply = client.post("/v1/chat/completions", json=chat).json()["choices"][0]
    assert choice["token_ids"] == greedy.token_ids  # greedy (the model's), 16 tokens (OpenAI's completions default)
    assert len(reply["token_ids"]) <= REPLY_TOKENS  # the model's max_new_tokens


def test_an_engine_seed_makes_unseeded_sampling_repeat(tmp_path: Path) -> None:
    """vLLM's --seed: the engine's random state, from which requests without a seed of their own draw."""
    model = str(make_tiny_llama(tmp_path / "plain"))
    params = SamplingParams(max_tokens=12, ignore_eos=True)  # temperature 1, no seed of its own

    def tokens(seed: int) -> list[int]:
        return LLM(model, max_model_len=64, seed=seed).generate([1, 2, 3], params)[0].outputs[0].token_ids

    assert tokens(5) == tokens(5) != tokens(6)
