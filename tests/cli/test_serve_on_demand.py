"""`sagellm serve --model NAME=MODEL ...`: the flags read as models on demand (refused where they would mean something
else), alone or beside the graph's own model, and a real server subprocess whose models the `openai` SDK lists and
talks to: the graph's, always loaded, and two on demand, one loaded at a time, the engine flags set on each."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess

import httpx
import openai
import pytest

from sagellm.cli import serve_cmd
from sagellm.cli.serve_cmd import _graph_model_given, _model_or_graph, _models_on_demand
from sagellm.cli.serve_flags import add_serve_arguments
from sagellm.gateway.config import ModelsOnDemand
from sagellm.gateway.control.engine_spec import pooled_spec
from tests.cli.test_cli import SAGELLM
from tests.cli.test_gateway_cli import free_port
from tests.cli.test_serve_model import wait_until_ready
from tests.tiny_models import make_tiny_llama


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_named_models_are_models_on_demand_and_one_model_stays_the_graph_s():
    args = parse("-m", "a=smollm2-135m-instruct", "--model", "b=/m/x.gguf", "--max-loaded-models", "1")
    assert _models_on_demand(args) == ModelsOnDemand({"a": "smollm2-135m-instruct", "b": "/m/x.gguf"}, max_loaded=1)
    assert args.model is None and not _graph_model_given(args)  # no model of the graph's own: on demand alone
    args = parse("--model", "smollm2-135m-instruct")
    assert _models_on_demand(args) is None and args.model == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    "argv",
    [
        ("-m", "smollm2-135m-instruct", "-m", "a=/m/x.gguf"),  # the model without a name is the graph's
        ("smollm2-135m-instruct", "-m", "a=/m/x.gguf"),
        ("pd", "-m", "a=/m/x.gguf"),  # a graph file, with its model
    ],
)
def test_named_models_are_served_beside_a_graph_s_own_model(argv):
    args = parse(*argv)
    assert _models_on_demand(args) == ModelsOnDemand({"a": "/m/x.gguf"})
    assert _graph_model_given(args)
    _model_or_graph(args)
    assert args.model in (None, "smollm2-135m-instruct")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (("-m", "a", "-m", "b"), "give each as NAME=MODEL"),
        (("-m", "a", "-m", "b", "-m", "c=x"), "one model without a name is the graph's own"),
        (("-m", "a=x", "-m", "a=y"), "each NAME once"),
        (("-m", "x", "--max-loaded-models", "2"), "for models given as --model NAME=MODEL"),
    ],
)
def test_flags_that_mean_no_set_of_named_models_are_refused(argv, words):
    with pytest.raises(ValueError, match=words):
        _models_on_demand(parse(*argv))


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (("-m", "a=/m/x.gguf", "--no-llm"), "--no-llm"),
        (("smollm2-135m-instruct", "-m", "a=/m/x.gguf", "--no-llm"), "--no-llm"),  # beside a graph's model too
        (("-m", "a=/m/x.gguf", "--served-model-name", "b"), "--served-model-name"),  # no graph's model to name
        (("-m", "a=smollm2-embed"), "one generation engine"),  # a preset of an embedding engine
    ],
)
def test_flags_not_served_with_models_on_demand_are_refused_before_anything_starts(argv, flag):
    with pytest.raises(ValueError, match=flag):
        serve_cmd.run(parse(*argv))


def test_a_preset_is_a_model_on_demand_served_by_its_engine_under_the_name_given(tmp_path):
    model = make_tiny_llama(tmp_path / "tiny")
    args = parse("-m", "chat=smollm2-cpu", "-m", f"tiny={model}", "--max-num-seqs", "4", "--autoscale", "1:3")
    on_demand = serve_cmd._checked_on_demand(args, _models_on_demand(args), None)
    assert on_demand.autoscale == {"min_instances": 1, "max_instances": 3}  # each model scaled from 1 to 3 engines
    chat = pooled_spec("chat", on_demand.models["chat"], on_demand.engine)
    assert (chat.model, chat.served_model_name, chat.max_concurrent, chat.label) == (
        "smollm2-135m-instruct", "chat", 16, "cpu")  # fmt: skip
    assert chat.engine["max_num_seqs"] == 4  # the flags' settings beneath the preset's own
    tiny = pooled_spec("tiny", on_demand.models["tiny"], on_demand.engine)
    assert (tiny.model, tiny.served_model_name, tiny.engine["max_num_seqs"]) == (str(model), "tiny", 4)


@pytest.mark.slow
def test_serve_two_models_on_demand_and_talk_to_both_through_the_openai_sdk(tmp_path):
    """Beside the graph's own model (`base`, always loaded), two models on demand, one loaded at a time."""
    base = make_tiny_llama(tmp_path / "base", seed=3)
    first = make_tiny_llama(tmp_path / "first", seed=1)
    second = make_tiny_llama(tmp_path / "second", seed=2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    models = [str(base), "--served-model-name", "base", "--model", f"first={first}", "--model", f"second={second}"]
    engine = ["--max-loaded-models", "1", "--max-num-seqs", "2", "--kv-cache-memory-gb", "0.05"]
    command = [SAGELLM, "serve", *models, *engine, "--port", str(port), "--no-embedding", "--retry-wait", "300"]
    env = {**os.environ, "SAGELLM_HOME": str(tmp_path / "home"), "SAGELLM_LOG_LEVEL": "warning"}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_until_ready(server, url, timeout_s=120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["base", "first", "second"]
        texts = {}
        for name in ("first", "base", "second", "first"):
            reply = client.completions.create(model=name, prompt="Hello", max_tokens=6, temperature=0)
            texts.setdefault(name, reply.choices[0].text)
            assert reply.choices[0].text == texts[name] and reply.model == name
            cards = {m["id"]: m["status"]["value"] for m in httpx.get(url + "/v1/models").json()["data"]}
            loaded = name if name != "base" else "first"
            assert cards == {"base": "loaded", loaded: "loaded", ({"first", "second"} - {loaded}).pop(): "unloaded"}
        assert len(set(texts.values())) == 3  # three models, not one answering for all
        engines = httpx.get(url + "/v1/management/models").status_code
        assert engines == 401  # the management API needs the admin key
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(60) == 0, server.stderr.read().decode()[-3000:] if server.stderr else ""
