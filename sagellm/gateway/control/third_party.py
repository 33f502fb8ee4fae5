"""How the control plane starts another project's OpenAI-compatible server as a managed engine (`kind: vllm`,
`sglang`, `llamacpp`): one table row per kind says which program runs it, how its command line names the model, the
port, the parallel sizes and the served name, and which of our engine settings it has a flag for. Everything else
about such an engine (supervision, restarts, drain, logs, routing) is what every managed engine gets; this module
only turns an engine's start request (`engine_spec.EngineSpec`) into a command line and an environment.

    vllm      vllm serve MODEL --host 127.0.0.1 --port P [--tensor-parallel-size N] [--pipeline-parallel-size N] ...
    sglang    python -m sglang.launch_server --model-path MODEL --host 127.0.0.1 --port P [--tp-size N] ...
    llamacpp  llama-server --model MODEL.gguf --host 127.0.0.1 --port P [--parallel N] ...

The program is the spec's `command`, else the kind's environment variable (`SAGELLM_VLLM`, ...), else the kind's
default (on PATH; for SGLang, sageLLM's own Python when it has the `sglang` package). One that is not there is a
FieldError naming what to install, before anything starts. The server gets the GPUs the gateway gave the engine
(`CUDA_VISIBLE_DEVICES`, empty: none) and a fresh API key, so only the gateway reaches it.

Only the operator names a program or any flag (a preset served with `--model NAME=PRESET`, the environment, the
Python control plane): a start request over the management API names neither `command` nor a flag outside its kind's
`requestable` ones (`check_requested_args`), flags that only tune how the server runs. The rest would make the admin
key a shell on the host: vLLM's --trust-remote-code runs the model's Python, --tool-parser-plugin and
--logits-processors import code, --config and --kv-transfer-config name modules and files, llama.cpp's --path serves a
folder and --log-file writes one, SGLang's --enable-custom-logit-processor runs code users send, and --host, --port
or --api-key would open the server to others."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Protocol

from sagellm.common.errors import FieldError


class ServerSpec(Protocol):
    """What of an engine's start request (`engine_spec.EngineSpec`) its server's command line is made from."""

    kind: str
    model: str
    tensor_parallel: int
    engine: dict[str, Any]
    command: str | None
    args: list[str]
    served_model_name: str | None


HOST = "127.0.0.1"  # a managed server listens here only: clients reach it through the gateway
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE]-?\d+)?")  # a flag's value that may start with '-' (--seed -1)

# The flags a start request over the API may give each kind's server in `args`: those that only tune how it runs
# (memory, batching, kernels, quantization, parsers by their built-in names), as spelled; none runs code, reads or
# writes a file the request names, or opens the server to others.
VLLM_REQUESTABLE = frozenset({
    "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--dtype", "--seed",
    "--enforce-eager", "--gpu-memory-utilization", "--swap-space", "--cpu-offload-gb", "--kv-cache-dtype",
    "--quantization", "-q", "--enable-prefix-caching", "--no-enable-prefix-caching", "--enable-chunked-prefill",
    "--no-enable-chunked-prefill", "--max-num-partial-prefills", "--max-long-partial-prefills",
    "--long-prefill-token-threshold", "--scheduling-policy", "--async-scheduling", "--max-seq-len-to-capture",
    "--num-gpu-blocks-override", "--disable-custom-all-reduce", "--disable-cascade-attn",
    "--disable-sliding-window", "--enable-expert-parallel", "--max-parallel-loading-workers", "--revision",
    "--max-logprobs", "--enable-auto-tool-choice", "--tool-call-parser", "--reasoning-parser",
    "--guided-decoding-backend", "--disable-log-stats", "--disable-log-requests", "--uvicorn-log-level",
    "--disable-uvicorn-access-log", "--disable-fastapi-docs", "--enable-force-include-usage",
    "--enable-prompt-tokens-details", "--return-tokens-as-token-ids",
})  # fmt: skip
SGLANG_REQUESTABLE = frozenset({
    "--context-length", "--max-running-requests", "--chunked-prefill-size", "--dtype", "--random-seed",
    "--mem-fraction-static", "--max-total-tokens", "--max-prefill-tokens", "--page-size", "--schedule-policy",
    "--schedule-conservativeness", "--cuda-graph-max-bs", "--disable-cuda-graph", "--disable-radix-cache",
    "--enable-torch-compile", "--torch-compile-max-bs", "--attention-backend", "--sampling-backend",
    "--grammar-backend", "--quantization", "--kv-cache-dtype", "--cpu-offload-gb", "--stream-interval",
    "--disable-overlap-schedule", "--enable-mixed-chunk", "--num-continuous-decode-steps", "--revision",
    "--tool-call-parser", "--reasoning-parser", "--watchdog-timeout", "--log-level", "--enable-cache-report",
    "--show-time-cost",
})  # fmt: skip
LLAMACPP_REQUESTABLE = frozenset({
    "--parallel", "-np", "--threads", "-t", "--seed", "-s", "--ctx-size", "-c", "--batch-size", "-b",
    "--ubatch-size", "-ub", "--threads-batch", "-tb", "--cont-batching", "-cb", "--no-cont-batching", "-nocb",
    "--flash-attn", "-fa", "--cache-type-k", "-ctk", "--cache-type-v", "-ctv", "--n-gpu-layers", "-ngl",
    "--split-mode", "-sm", "--tensor-split", "-ts", "--main-gpu", "-mg", "--no-mmap", "--mlock",
    "--no-kv-offload", "-nkvo", "--cache-reuse", "--swa-full", "--context-shift", "--no-context-shift",
    "--defrag-thold", "-dt", "--rope-scaling", "--rope-freq-base", "--rope-freq-scale", "--n-predict", "-n",
    "--keep", "--temp", "--top-k", "--top-p", "--min-p", "--jinja", "--reasoning-format", "--reasoning-budget",
    "--no-warmup", "--no-slots", "--no-webui", "--timeout", "-to", "--threads-http", "--log-disable",
})  # fmt: skip


@dataclass(frozen=True)
class ServerKind:
    """One third-party server: how it is found, and how its command line says what a start request says."""

    title: str  # its name in messages
    program: str | None  # run when no command is named: an executable on PATH; None: this Python (with `module`)
    module: str | None  # the Python package this Python must have when `program` is None
    command_env: str  # the environment variable that names its program instead (a command line, shlex-split)
    install: str  # what to install when it is missing, and how
    launch: tuple[str, ...]  # the program's arguments before the model
    served_name: str  # its flag for the name clients send
    tensor_parallel: str | None  # its flag; None: it has none (tensor_parallel stays 1)
    settings: dict[str, str]  # our engine setting -> its flag for the same thing
    key_env: str | None  # the environment variable it reads its API key from; None: its --api-key flag
    requestable: frozenset[str]  # its flags a start request over the API may give in `args` (the operator: any)
    always: tuple[str, ...] = ()  # flags it always gets (metrics the health checks read)
    on_gpu: tuple[str, ...] = ()  # flags it gets when it has GPUs


KINDS: dict[str, ServerKind] = {
    "vllm": ServerKind(
        title="vLLM",
        program="vllm",
        module=None,
        command_env="SAGELLM_VLLM",
        install="vLLM (pip install vllm)",
        launch=("serve",),
        served_name="--served-model-name",
        tensor_parallel="--tensor-parallel-size",
        settings={
            "pipeline_parallel_size": "--pipeline-parallel-size",
            "max_model_len": "--max-model-len",
            "max_num_seqs": "--max-num-seqs",
            "max_num_batched_tokens": "--max-num-batched-tokens",
            "long_prefill_token_threshold": "--long-prefill-token-threshold",
            "max_num_partial_prefills": "--max-num-partial-prefills",
            "max_long_partial_prefills": "--max-long-partial-prefills",
            "kv_cache_memory_gb": "--kv-cache-memory-bytes",
            "block_size": "--block-size",
            "dtype": "--dtype",
            "seed": "--seed",
        },
        key_env="VLLM_API_KEY",
        requestable=VLLM_REQUESTABLE,
    ),
    "sglang": ServerKind(
        title="SGLang",
        program=None,
        module="sglang",
        command_env="SAGELLM_SGLANG",
        install="SGLang (pip install 'sglang[all]')",
        launch=("-m", "sglang.launch_server", "--model-path"),
        served_name="--served-model-name",
        tensor_parallel="--tp-size",
        settings={
            "pipeline_parallel_size": "--pp-size",
            "max_model_len": "--context-length",
            "max_num_seqs": "--max-running-requests",
            "max_num_batched_tokens": "--chunked-prefill-size",
            "dtype": "--dtype",
            "seed": "--random-seed",
        },
        key_env=None,
        requestable=SGLANG_REQUESTABLE,
        always=("--enable-metrics",),
    ),
    "llamacpp": ServerKind(
        title="llama.cpp",
        program="llama-server",
        module=None,
        command_env="SAGELLM_LLAMACPP",
        install="llama.cpp's llama-server (a release of github.com/ggml-org/llama.cpp)",
        launch=("--model",),
        served_name="--alias",
        tensor_parallel=None,
        settings={"max_num_seqs": "--parallel", "num_threads": "--threads", "seed": "--seed"},
        key_env="LLAMA_API_KEY",
        requestable=LLAMACPP_REQUESTABLE,
        always=("--metrics",),
        on_gpu=("--n-gpu-layers", "999"),  # every layer on the GPUs it was given
    ),
}


@dataclass(frozen=True)
class Launch:
    """A server's command line, what its environment adds to the gateway's, and where and how it is reached."""

    command: list[str]
    env: dict[str, str]
    url: str
    api_key: str


def check_settings(spec: ServerSpec) -> None:
    """Raises FieldError for what the kind's server has no flag for: a tensor parallel size, an engine setting (its
    own flags go in `args`); and for a model or served name its command line would read as a flag."""
    kind = KINDS[spec.kind]
    for name in ("model", "served_model_name"):
        if (getattr(spec, name) or "").startswith("-"):
            raise FieldError(name, f"{name} must not start with '-': {kind.title}'s command line would read it as a "
                                   "flag")  # fmt: skip
    if spec.tensor_parallel > 1 and kind.tensor_parallel is None:
        raise FieldError("tensor_parallel", f"{kind.title} has no tensor parallelism; leave tensor_parallel at 1 "
                                            "(its own --split-mode goes in `args`)")  # fmt: skip
    for name in spec.engine:
        if name not in kind.settings:
            raise FieldError(f"engine.{name}", f"a {spec.kind} engine takes the settings {', '.join(kind.settings)}; "
                                               f"give its other flags in `args`")  # fmt: skip


def check_requested_args(spec: ServerSpec) -> None:
    """Raises FieldError naming `args` for a flag a start request over the API may not give: one outside the kind's
    `requestable` flags, which are matched as spelled (`--flag` or `--flag=value`), so an abbreviation argparse would
    expand or vLLM's `_` for `-` is refused too. A word that is not a flag is a flag's value (a number may start with
    '-'); it cannot become a flag of its own, since the command line is run without a shell."""
    kind = KINDS[spec.kind]
    for arg in spec.args:
        flag = arg.split("=", 1)[0]
        if arg.startswith("-") and not _NUMBER.fullmatch(arg) and flag not in kind.requestable:
            raise FieldError("args", f"args: {flag!r} is not a flag a request may give a {spec.kind} engine (only the "
                                     f"operator may: a preset served with --model NAME=PRESET); a request may give "
                                     f"{', '.join(sorted(kind.requestable))}")  # fmt: skip


def program(spec: ServerSpec) -> list[str]:
    """The command that runs the kind's server (before its arguments); FieldError when it is not installed here."""
    kind = KINDS[spec.kind]
    named = spec.command or os.environ.get(kind.command_env)
    if named:
        words = shlex.split(named)
        if not words or shutil.which(words[0]) is None:
            field, where = ("command", "command") if spec.command else ("kind", f"${kind.command_env}")
            raise FieldError(field, f"{kind.title} is not installed here: {where} is {named!r}, which names no "
                                    f"executable; install {kind.install}")  # fmt: skip
        return words
    if kind.program is None:
        assert kind.module is not None  # a kind run by this Python names the package it needs
        if importlib.util.find_spec(kind.module) is None:
            raise FieldError("kind", f"{kind.title} is not installed here: sageLLM's Python ({sys.executable}) has no "
                                     f"{kind.module!r} package; install {kind.install}, or set {kind.command_env} (or "
                                     "`command`) to a Python that has it")  # fmt: skip
        return [sys.executable]
    if shutil.which(kind.program) is None:
        raise FieldError("kind", f"{kind.title} is not installed here: no {kind.program!r} on PATH; install "
                                 f"{kind.install}, or set {kind.command_env} (or `command`) to "
                                 "its executable")  # fmt: skip
    return [kind.program]


def server_launch(spec: ServerSpec, port: int, api_key: str, gpus: list[int]) -> Launch:
    """The command line and environment of the server of `spec` on `HOST:port`, taking `api_key` and seeing only
    `gpus`. FieldError when its program is not installed."""
    kind = KINDS[spec.kind]
    command = [*program(spec), *kind.launch, spec.model, "--host", HOST, "--port", str(port)]
    if spec.tensor_parallel > 1:
        assert kind.tensor_parallel is not None  # `check_settings` refuses it otherwise
        command += [kind.tensor_parallel, str(spec.tensor_parallel)]
    for name, value in spec.engine.items():
        if value is not None:
            command += [kind.settings[name], _flag_value(name, value)]
    if spec.served_model_name:
        command += [kind.served_name, spec.served_model_name]
    command += [*kind.always, *(kind.on_gpu if gpus else ())]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    if kind.key_env is not None:
        env[kind.key_env] = api_key
    else:
        command += ["--api-key", api_key]
    return Launch([*command, *spec.args], env, f"http://{HOST}:{port}", api_key)


def _flag_value(name: str, value: Any) -> str:
    """A setting's value as the server's flag takes it: our KV cache size in GiB is vLLM's in bytes."""
    if name == "kv_cache_memory_gb":
        return str(round(value * 2**30))
    return str(value)
