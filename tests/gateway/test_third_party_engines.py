"""Managed third-party engines (`kind: vllm|sglang|llamacpp`): the command line and environment each kind's server
starts with (no server needed), and the flags a start request over the API may give (those that tune a server: no
program, no flag that runs code, reads or writes files or opens the server); through the management API of a real
gateway, the 400 naming what to install when the program is missing, and a stand-in `vllm` (a few lines of stdlib
HTTP) supervised as our engines are: ready once it answers, restarted when killed, failed with its own last words,
stopped with nothing left behind; and, where vLLM is installed ($SAGELLM_VLLM or `vllm` on PATH), a real vLLM server
started by `sagellm engine start --kind vllm`, serving a chat through the gateway until `sagellm engine stop`."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sagellm.common.errors import FieldError
from sagellm.common.processes import alive
from sagellm.gateway.control.engine_spec import EngineSpec
from sagellm.gateway.control.third_party import KINDS, server_launch
from sagellm.presets import PresetError, load_preset
from tests.cli.in_process import in_process

ENGINES = "/v1/management/engines"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
VLLM = os.environ.get("SAGELLM_VLLM") or shutil.which("vllm")
LLAMACPP = os.environ.get("SAGELLM_LLAMACPP") or shutil.which("llama-server")
NO_SGLANG = pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="SGLang is installed here")
SMOLLM2_HF = Path("/tmp/peers/smollm2-hf")  # fp32 HF weights vLLM loads (tests/../shared/peers/setup.sh makes them)

# A stand-in for vLLM's server: answers /v1/models to the key it was given, says how it was started, and fails as a
# server with a bad model does when its model is "broken".
FAKE_VLLM = """\
import http.server, os, sys
args = sys.argv[1:]
print("fake vllm", *args, "gpus=" + os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
if args[1] == "broken":
    sys.exit("ValueError: broken is not a model")
key = os.environ["VLLM_API_KEY"]

class Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/v1/models" and self.headers.get("authorization") == "Bearer " + key
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b'{"object": "list", "data": []}')

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), Models).serve_forever()
"""


def executable(folder: Path, name: str, body: str = "") -> Path:
    """An executable `folder/name` run by this Python."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def spec(**fields: Any) -> EngineSpec:
    checked = EngineSpec(**fields)
    checked.check()
    return checked


def wait_for(admin: httpx.Client, engine_id: str, done: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        engine = admin.get(f"{ENGINES}/{engine_id}").json()
        if done(engine) or time.monotonic() > deadline:
            return engine
        time.sleep(0.1)


# -- (a) the command line of each kind ----------------------------------------------------------------------------
def test_vllm_gets_its_flags_its_gpus_and_a_key_in_its_environment(tmp_path, monkeypatch):
    vllm = executable(tmp_path, "vllm")
    monkeypatch.setenv("SAGELLM_VLLM", str(vllm))
    settings = {"pipeline_parallel_size": 2, "kv_cache_memory_gb": 0.5, "max_model_len": 2048, "dtype": "float32"}
    model = spec(model="org/model", kind="vllm", tensor_parallel=2, served_model_name="chat", engine=settings,
                 args=["--enforce-eager"])  # fmt: skip
    launch = server_launch(model, 8123, "KEY", [2, 3])
    assert launch.command == [
        str(vllm), "serve", "org/model", "--host", "127.0.0.1", "--port", "8123", "--tensor-parallel-size", "2",
        "--pipeline-parallel-size", "2", "--kv-cache-memory-bytes", str(2**29), "--max-model-len", "2048",
        "--dtype", "float32", "--served-model-name", "chat", "--enforce-eager",
    ]  # fmt: skip
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "2,3", "VLLM_API_KEY": "KEY"}  # the key stays off `ps`


def test_sglang_runs_as_a_module_of_the_python_named_and_takes_its_key_as_a_flag(tmp_path):
    python = executable(tmp_path, "python")
    engine = {"pipeline_parallel_size": 2, "max_model_len": 4096, "max_num_seqs": 8, "seed": 7}
    launch = server_launch(
        spec(model="org/model", kind="sglang", command=f"{python} -X utf8", tensor_parallel=4, engine=engine),
        30000,
        "KEY",
        [0, 1, 2, 3, 4, 5, 6, 7],
    )
    assert launch.command == [
        str(python), "-X", "utf8", "-m", "sglang.launch_server", "--model-path", "org/model", "--host", "127.0.0.1",
        "--port", "30000", "--tp-size", "4", "--pp-size", "2", "--context-length", "4096",
        "--max-running-requests", "8", "--random-seed", "7", "--enable-metrics", "--api-key", "KEY",
    ]  # fmt: skip
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}


def test_llama_server_from_path_gets_every_layer_on_its_gpu_and_none_without(tmp_path, monkeypatch):
    executable(tmp_path / "bin", "llama-server")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("SAGELLM_LLAMACPP", raising=False)
    gguf = spec(model="m.gguf", kind="llamacpp", served_model_name="smollm2", engine={"max_num_seqs": 16})
    on_gpu = server_launch(gguf, 8080, "KEY", [1])
    assert on_gpu.command == [
        "llama-server", "--model", "m.gguf", "--host", "127.0.0.1", "--port", "8080", "--parallel", "16",
        "--alias", "smollm2", "--metrics", "--n-gpu-layers", "999",
    ]  # fmt: skip
    assert on_gpu.env == {"CUDA_VISIBLE_DEVICES": "1", "LLAMA_API_KEY": "KEY"}
    on_cpu = server_launch(gguf, 8080, "KEY", [])
    assert on_cpu.command == on_gpu.command[:-2] and on_cpu.env["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"kind": "llamacpp", "tensor_parallel": 2}, "tensor_parallel", "llama.cpp has no tensor parallelism"),
        ({"kind": "llamacpp", "engine": {"max_model_len": 2048}}, "engine.max_model_len", "give its other flags in"),
        ({"kind": "vllm", "engine": {"num_kv_blocks": 64}}, "engine.num_kv_blocks", "a vllm engine takes the settings"),
        ({"kind": "sglang", "engine": {"kv_cache_memory_gb": 1.0}}, "engine.kv_cache_memory_gb", "sglang engine takes"),
        ({"kind": "vllm", "engine": {"max_num_seqs": 0}}, "engine.max_num_seqs", "max_num_seqs must be >= 1"),
        ({"kind": "vllm", "placement": "ray:gpus"}, "placement", "runs on the gateway's host"),
        ({"kind": "vllm", "url": "http://127.0.0.1:8000"}, "url", "a vllm engine is started here"),
        ({"kind": "llm", "command": "vllm"}, "command", "command and args are for vllm, sglang and llamacpp"),
        ({"kind": "openai", "url": "http://h", "args": ["--x"]}, "command", "not openai"),
        ({"kind": "vllm", "command": " "}, "command", "command must be a non-empty name"),
        ({"kind": "vllm", "model": "--trust-remote-code"}, "model", "must not start with '-'"),  # `vllm serve -...`
        ({"kind": "sglang", "served_model_name": "-x"}, "served_model_name", "SGLang's command line would read it"),
    ],
)
def test_what_a_kind_has_no_flag_for_is_refused(fields, field, words):
    with pytest.raises(FieldError) as raised:
        spec(**{"model": "m", **fields})
    assert raised.value.field == field and words in str(raised.value)


@pytest.mark.parametrize(
    ("kind", "args", "refused"),
    [
        ("vllm", ["--trust-remote-code"], "--trust-remote-code"),  # runs the model's own Python
        ("vllm", ["--trust_remote_code"], "--trust_remote_code"),  # vLLM's parser takes `_` for `-`
        ("vllm", ["--trust-remote"], "--trust-remote"),  # argparse expands an abbreviation
        ("vllm", ["--enforce-eager", "--tool-parser-plugin", "/tmp/p.py"], "--tool-parser-plugin"),  # imports a file
        ("vllm", ["--max-logprobs=5", "--config=/tmp/all-of-the-above.yaml"], "--config"),
        ("vllm", ["--host=0.0.0.0"], "--host"),  # opens the server beyond the gateway
        ("llamacpp", ["--path", "/"], "--path"),  # serves a folder
        ("llamacpp", ["-c", "8192", "--log-file", "/tmp/written"], "--log-file"),
        ("sglang", ["--enable-custom-logit-processor"], "--enable-custom-logit-processor"),  # runs code users send
        ("sglang", ["--", "x"], "--"),
    ],
)
def test_a_request_gives_only_the_flags_that_tune_a_server(kind, args, refused):
    with pytest.raises(FieldError) as raised:
        spec(model="m", kind=kind, args=args).check_requested()
    assert raised.value.field == "args" and f"args: {refused!r} is not a flag a request may" in str(raised.value)


def test_flags_that_tune_a_server_and_their_values_pass(tmp_path):
    for kind, args in [
        ("vllm", ["--enforce-eager", "--gpu-memory-utilization", "0.5", "--seed", "-1", "--max-logprobs=5"]),
        ("llamacpp", ["-c", "8192", "-fa", "on", "--threads", "2"]),
        ("sglang", ["--mem-fraction-static", "0.7", "--disable-radix-cache"]),
    ]:
        spec(model="m", kind=kind, args=args).check_requested()  # no error
    with pytest.raises(FieldError, match=r"command: a request cannot name the program .*\$SAGELLM_VLLM") as raised:
        spec(model="m", kind="vllm", command=str(executable(tmp_path, "vllm"))).check_requested()
    assert raised.value.field == "command"


def test_a_preset_engine_takes_the_same_kinds_and_checks(tmp_path):
    preset = tmp_path / "peers.yaml"
    preset.write_text(
        "version: 1\nname: peers\nengines:\n"
        "  - {name: v, kind: vllm, model: org/m, command: /opt/vllm/bin/vllm, args: [--enforce-eager],"
        " engine: {max_model_len: 2048}}\n"
        "  - {name: l, kind: llamacpp, model: m.gguf, tensor_parallel: 2}\n"
    )
    with pytest.raises(PresetError, match=r"peers.yaml: engines\[1\].tensor_parallel: llama.cpp has no tensor"):
        load_preset(preset)
    preset.write_text(preset.read_text().rsplit("  - ", 1)[0])
    (engine,) = load_preset(preset).engines
    assert engine.spec() == EngineSpec(model="org/m", kind="vllm", label="v", command="/opt/vllm/bin/vllm",
                                       args=["--enforce-eager"], engine={"max_model_len": 2048})  # fmt: skip


# -- (b) through a real gateway's management API ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("vllm", "vLLM is not installed here: no 'vllm' on PATH; install vLLM (pip install vllm), or set SAGELLM_VLLM"),
        ("llamacpp", "llama.cpp is not installed here: no 'llama-server' on PATH; install llama.cpp's llama-server"),
        pytest.param("sglang", "has no 'sglang' package; install SGLang (pip install 'sglang[all]')", marks=NO_SGLANG),
    ],
)
def test_a_missing_program_is_a_400_that_says_what_to_install(admin, tmp_path, monkeypatch, kind, words):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    for name in ("SAGELLM_VLLM", "SAGELLM_SGLANG", "SAGELLM_LLAMACPP"):
        monkeypatch.delenv(name, raising=False)
    reply = admin.post(ENGINES, json={"model": "m", "kind": kind})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["param"] == "kind"
    monkeypatch.setenv(KINDS[kind].command_env, str(tmp_path / "missing"))  # the operator's, where the gateway runs
    named = admin.post(ENGINES, json={"model": "m", "kind": kind})
    assert named.status_code == 400 and named.json()["error"]["param"] == "kind"
    assert f"${KINDS[kind].command_env} is " in named.json()["error"]["message"]
    assert "which names no executable" in named.json()["error"]["message"]
    assert [e for e in admin.get(ENGINES).json()["data"] if e["kind"] == kind] == []  # nothing was registered


def test_the_cli_says_what_to_install_and_exits_2(gateway, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("SAGELLM_LLAMACPP", raising=False)
    ran = in_process(capsys, monkeypatch, tmp_path, "engine", "start", "m.gguf", "--kind", "llamacpp",
                     "--url", gateway.url, "--admin-key", gateway.gateway.admin_key)  # fmt: skip
    assert ran.code == 2 and "llama.cpp is not installed here" in ran.err and "Traceback" not in ran.err


@pytest.mark.slow
def test_a_started_server_is_supervised_as_our_engines_are(admin, gateway, tmp_path, monkeypatch):
    """The stand-in `vllm`: ready once /v1/models answers to its key; killed, started again on the same URL;
    stopped, its whole process group gone; its output in the engine's log. One that exits at start is failed with
    its last words."""
    monkeypatch.setenv("SAGELLM_VLLM", str(executable(tmp_path, "vllm", FAKE_VLLM)))
    created = admin.post(ENGINES, json={"model": "stand-in", "kind": "vllm", "served_model_name": "fake"})
    broken = admin.post(ENGINES, json={"model": "broken", "kind": "vllm"})
    assert created.status_code == broken.status_code == 201, created.text + broken.text
    engine = wait_for(admin, created.json()["id"], lambda e: e["state"] != "starting")
    assert engine["state"] == "ready" and engine["url"].startswith("http://127.0.0.1:") and engine["model"] == "fake"
    failed = wait_for(admin, broken.json()["id"], lambda e: e["state"] != "starting")
    assert failed["state"] == "failed" and "ValueError: broken is not a model" in failed["last_error"]

    os.kill(engine["pid"], signal.SIGKILL)
    back = wait_for(admin, engine["id"], lambda e: e["restarts"] == 1 and e["state"] == "ready")
    assert back["state"] == "ready" and back["pid"] != engine["pid"] and back["url"] == engine["url"]
    assert "killed by SIGKILL" in back["last_error"]

    log_file = gateway.gateway.engines.engines[engine["id"]].directory / "engine.log"
    for stopped in (engine, failed):
        assert admin.delete(f"{ENGINES}/{stopped['id']}").json()["state"] == "stopped"
    assert not alive(back["pid"])
    lives = [line for line in log_file.read_text().splitlines() if line.startswith("fake vllm")]
    assert len(lives) == 2 and lives[0].startswith("fake vllm serve stand-in --host 127.0.0.1 --port ")
    assert lives[0].endswith("--served-model-name fake gpus=")


# -- (c) a real vLLM ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)  # vLLM-CPU takes minutes to start on 2 cores
@pytest.mark.skipif(VLLM is None, reason="vLLM is not installed: set SAGELLM_VLLM to a vllm executable, or put vllm "
                                         "on PATH")  # fmt: skip
@pytest.mark.skipif(not SMOLLM2_HF.is_dir(), reason=f"no HF copy of SmolLM2-135M-Instruct at {SMOLLM2_HF}")
def test_sagellm_engine_start_kind_vllm_serves_through_the_gateway(gateway, tmp_path, capsys, monkeypatch):
    small = ["--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-gb", "1", "--max-num-seqs", "4"]
    cli = (gateway, tmp_path, capsys, monkeypatch)
    engine = start_by_cli(*cli, SMOLLM2_HF, "vllm", VLLM, "smollm2-vllm", *small, "--engine-args=--enforce-eager")

    chat = {"model": "smollm2-vllm", "messages": CHAT, "max_tokens": 8, "temperature": 0}
    reply = httpx.post(gateway.url + "/v1/chat/completions", json=chat, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "smollm2-vllm" and reply.json()["usage"]["completion_tokens"] > 0
    assert reply.json()["choices"][0]["message"]["content"]

    log_file = engine.directory / "engine.log"
    stop_by_cli(*cli, engine)
    assert "vLLM" in log_file.read_text()


# -- (d) a real llama.cpp server ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.network  # the SmolLM2 GGUF
@pytest.mark.skipif(LLAMACPP is None, reason="llama.cpp's server is not installed: set SAGELLM_LLAMACPP to a "
                                             "llama-server executable, or put llama-server on PATH")  # fmt: skip
def test_sagellm_engine_start_kind_llamacpp_serves_through_the_gateway(gateway, smollm2_dir, tmp_path, capsys,
                                                                        monkeypatch):  # fmt: skip
    """llama.cpp's own server on the shipped SmolLM2 GGUF, started, asked through the gateway and stopped by the
    CLI: its greedy reply is what the same server answers directly."""
    gguf = next(smollm2_dir.glob("*.gguf"))
    cli = (gateway, tmp_path, capsys, monkeypatch)
    engine = start_by_cli(
        *cli, gguf, "llamacpp", LLAMACPP, "smollm2-llamacpp", "--max-num-seqs", "2", "--num-threads", "2"
    )

    chat = {"model": "smollm2-llamacpp", "messages": CHAT, "max_tokens": 8, "temperature": 0}
    reply = httpx.post(gateway.url + "/v1/chat/completions", json=chat, timeout=120)
    assert reply.status_code == 200, reply.text
    direct = httpx.post(engine.url + "/v1/chat/completions", json=chat, timeout=120,
                        headers={"authorization": f"Bearer {engine.api_key}"})  # fmt: skip
    assert reply.json()["choices"][0]["message"]["content"] == direct.json()["choices"][0]["message"]["content"]

    stop_by_cli(*cli, engine)


def start_by_cli(gateway, tmp_path, capsys, monkeypatch, model, kind, command, name, *flags) -> Any:
    """`sagellm engine start MODEL --kind KIND` against the gateway, whose operator named `command` as the kind's
    program (its environment variable: the gateway runs in this process); the engine, ready."""
    monkeypatch.setenv(KINDS[kind].command_env, str(command))
    connect = ["--url", gateway.url, "--admin-key", gateway.gateway.admin_key]
    started = in_process(capsys, monkeypatch, tmp_path, "engine", "start", str(model), "--kind", kind,
                         "--served-model-name", name, *flags, *connect)  # fmt: skip
    engine = next(e for e in gateway.gateway.engines.engines.values() if e.name == name)
    assert started.code == 0, started.out + started.err + engine.directory.joinpath("engine.log").read_text()[-3000:]
    assert engine.state == "ready" and engine.spec.kind == kind
    return engine


def stop_by_cli(gateway, tmp_path, capsys, monkeypatch, engine) -> None:
    """`sagellm engine stop ID`: it says stopped, and the server's process is gone."""
    pid = engine.pid
    connect = ["--url", gateway.url, "--admin-key", gateway.gateway.admin_key]
    stopped = in_process(capsys, monkeypatch, tmp_path, "engine", "stop", engine.id, *connect)
    assert stopped.code == 0 and "stopped" in stopped.out, stopped.out + stopped.err
    assert pid is not None and not alive(pid)
