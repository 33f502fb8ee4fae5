"""vLLM habits at the front door: `sagellm serve MODEL` with vLLM's engine flags (a real server subprocess whose
context is the flag's, not the model's: /v1/models says it and a longer prompt is a 400), the positional argument
read as a model or a graph, the flags set on every engine node, and `sagellm chat` piped and against a server."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from sagellm.cli.gateway_cmd import _serve_argv
from sagellm.cli.run_cmd import build_graph
from sagellm.cli.serve_cmd import _model_or_graph, apply_autoscale, apply_engine_settings
from sagellm.cli.serve_flags import add_serve_arguments
from tests.cli.test_cli import SAGELLM
from tests.cli.test_gateway_cli import free_port, sagellm
from tests.tiny_models import make_tiny_llama

SAGELLM_ARGS = ("--no-embedding",)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("serve-model") / "tiny-llama", max_position_embeddings=512)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "graph_name", "model"),
    [
        ((), "colocated.yaml", None),
        (("pd",), "pd", None),
        (("graphs/pd.yaml",), "graphs/pd.yaml", None),
        (("smollm2-135m-instruct",), "colocated.yaml", "smollm2-135m-instruct"),
        (("/models/x.gguf",), "colocated.yaml", "/models/x.gguf"),
    ],
)
def test_the_positional_argument_is_a_graph_or_else_a_model(argv, graph_name, model):
    args = parse(*argv)
    _model_or_graph(args)
    assert args.graph.endswith(graph_name) and args.model == model


def test_a_model_named_twice_is_refused():
    with pytest.raises(ValueError, match="give one or the other"):
        _model_or_graph(parse("smollm2-135m-instruct", "--model", "other"))


def test_engine_flags_set_every_engine_node_and_are_checked_as_the_file_is(tiny):
    args = parse("pd", "--model", str(tiny), "--max-model-len", "128", "--max-num-seqs", "4")
    _model_or_graph(args)
    graph = apply_engine_settings(build_graph(args), args)
    engines = {n.id: n.params for n in graph.nodes.values() if "max_num_seqs" in n.params}
    assert set(engines) == {"prefill", "decode"}
    assert all(p["max_model_len"] == 128 and p["max_num_seqs"] == 4 for p in engines.values())
    assert all("prefault_kv_cache" not in p for p in engines.values()), "a server maps its KV cache ahead of use"
    args = parse("pd", "--dtype", "float16")
    with pytest.raises(ValueError, match="bfloat16"):  # what the engine takes: auto, float32, bfloat16
        apply_engine_settings(build_graph(args), args)
    args = parse("pd", "-tp", "2")  # vLLM's short flag: every engine node's tensor_parallel_size
    graph = apply_engine_settings(build_graph(args), args)
    split = {n.id: n.params["tensor_parallel_size"] for n in graph.nodes.values() if "tensor_parallel_size" in n.params}
    assert split == {"prefill": 2, "decode": 2}


def test_autoscale_bounds_join_the_graph_s_autoscale_settings_and_are_checked_as_the_file_is():
    args = parse("colocated", "--autoscale", "1:3")
    graph = build_graph(args)
    graph.attrs["autoscale"] = {"down_delay_s": 5}
    graph = apply_autoscale(graph, args.autoscale)
    assert graph.attrs["autoscale"] == {"down_delay_s": 5, "min_instances": 1, "max_instances": 3}
    with pytest.raises(ValueError, match="expected MIN:MAX"):
        apply_autoscale(build_graph(args), "3")
    with pytest.raises(ValueError, match="min_instances <= max_instances"):
        apply_autoscale(build_graph(args), "3:1")
    assert _serve_argv(*_parsed("--autoscale", "2:4"))[-2:] == ["--autoscale", "2:4"]  # `gateway start` passes it


def _parsed(*argv: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser, parser.parse_args(list(argv))


def test_gateway_start_forwards_boolean_flags_both_ways():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    on = _serve_argv(parser, parser.parse_args(["--enable-prefix-caching"]))
    off = _serve_argv(parser, parser.parse_args(["--no-enable-prefix-caching", "-tp", "1"]))
    assert "--enable-prefix-caching" in on and "--no-enable-prefix-caching" not in on
    assert "--no-enable-prefix-caching" in off


@pytest.mark.slow
def test_serve_a_model_with_vllm_flags_and_tensor_parallel_and_chat_with_it(tiny, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [SAGELLM, "serve", str(tiny), "--max-model-len", "64", "-tp", "2", "--port", str(port), *SAGELLM_ARGS]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=_env(tmp_path))  # fmt: skip
    try:
        wait_until_ready(server, url)
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [(str(tiny), 64)]  # the flag's, not the model's 512
        long = httpx.post(url + "/v1/completions", json={"prompt": list(range(1, 101)), "max_tokens": 4}, timeout=60)
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        short = httpx.post(url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4}, timeout=60)
        assert short.status_code == 200, short.text

        chatted = sagellm(tmp_path / "home", "chat", "--url", url, "--max-tokens", "5", input_text="Hello there")
        assert chatted.returncode == 0 and chatted.stdout.strip(), chatted.stderr
    finally:
        server.terminate()
        server.wait(60)
    deadline = time.monotonic() + 10  # the engine's second tensor parallel rank stops with it
    while time.monotonic() < deadline and ranks_of(tiny):
        time.sleep(0.2)
    assert not ranks_of(tiny)


def ranks_of(model: Path) -> list[str]:
    """Tensor parallel rank processes alive for `model`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "sagellm.runtime.parallel.rank_worker" in text and str(model) in text:
            found.append(text)
    return found


@pytest.mark.slow
def test_chat_piped_to_a_local_model_answers_once_on_stdout(tiny, tmp_path):
    # greedy: a sampled reply from random weights may end on its first token, and then there is nothing to print
    ran = sagellm(tmp_path, "chat", str(tiny), "--max-tokens", "6", "--temperature", "0", input_text="Hello")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() and "sagellm chat: main: loading" in ran.stderr  # the reply alone on stdout
    empty = sagellm(tmp_path, "chat", str(tiny), input_text="")
    assert empty.returncode == 2 and "stdin was empty" in empty.stderr
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}  # fmt: skip
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    shaped = sagellm(tmp_path, "chat", str(tiny), "--json-schema", str(tmp_path / "schema.json"), input_text="Hi")
    assert shaped.returncode == 0 and json.loads(shaped.stdout)["answer"] in ("yes", "no"), shaped.stderr
    (tmp_path / "bad.json").write_text('{"type": "objec"}')
    bad = sagellm(tmp_path, "chat", str(tiny), "--json-schema", str(tmp_path / "bad.json"), input_text="Hi")
    assert bad.returncode == 2 and "Invalid type: objec" in bad.stderr and "Traceback" not in bad.stderr


def wait_until_ready(server: subprocess.Popen, url: str, timeout_s: float = 180) -> None:
    """Until the server at `url` answers /ready with a 200 (or its process ends, or the time runs out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url + "/ready").status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "SAGELLM_HOME": str(tmp_path / "home"), "SAGELLM_LOG_LEVEL": "warning"}


@pytest.mark.slow
def test_serve_with_api_servers_stops_them_on_ctrl_c_and_they_leave_with_a_killed_gateway(tiny, tmp_path):
    """Ctrl-C (SIGINT) reaches the gateway alone and it stops its API servers in order; a gateway killed outright
    (kill -9) leaves no API server answering for a core that is gone."""
    for stop in (signal.SIGINT, signal.SIGKILL):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [SAGELLM, "serve", str(tiny), "--api-servers", "2", "--port", str(port), *SAGELLM_ARGS]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(tmp_path))
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and server.poll() is None and len(api_servers_of(server.pid)) < 2:
                time.sleep(0.3)
            assert len(api_servers_of(server.pid)) == 2
            while time.monotonic() < deadline and not answers(url + "/ready"):
                time.sleep(0.3)
            reply = httpx.post(url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4}, timeout=60)
            assert reply.status_code == 200, reply.text
            children = api_servers_of(server.pid)
            server.send_signal(stop)
            assert server.wait(60) in (0, -signal.SIGKILL)
            deadline = time.monotonic() + 15  # orphans notice their parent is gone within a second or so
            while time.monotonic() < deadline and any(map(alive, children)):
                time.sleep(0.2)
            assert not [pid for pid in children if alive(pid)]
        finally:
            if server.poll() is None:
                server.kill()


def answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet, as orphans may stay in a container, has ended)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def api_servers_of(parent: int) -> list[int]:
    """The API server processes `parent` started."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{parent}\n" in text and b"sagellm.gateway.api_servers.server" in cmdline:
            found.append(int(status.parent.name))
    return found


def test_lora_modules_are_name_path_pairs_or_vllm_s_json_naming_their_base_each_name_once():
    from sagellm.cli.serve_cmd import _lora_modules

    assert _lora_modules(["sql=/a/sql", "chat=/a/chat"]) == ({"sql": "/a/sql", "chat": "/a/chat"}, {})
    assert _lora_modules(None) == ({}, {})
    json_form = '{"name": "sql", "path": "/a/sql", "base_model_name": "code"}'
    assert _lora_modules([json_form, "chat=/a/chat"]) == ({"sql": "/a/sql", "chat": "/a/chat"}, {"sql": "code"})
    with pytest.raises(ValueError, match="NAME=PATH"):
        _lora_modules(["/a/sql"])
    with pytest.raises(ValueError, match="each NAME once"):
        _lora_modules(["sql=/a", "sql=/b"])
    with pytest.raises(ValueError, match="not base"):
        _lora_modules(['{"name": "sql", "path": "/a", "base": "code"}'])
