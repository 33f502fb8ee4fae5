"""`sagellm engine list|start|stop`: the engines of a running gateway, through its management API.

    sagellm engine list
    sagellm engine start smollm2-135m-instruct --served-model-name smollm2 --max-concurrent 16
    sagellm engine start all-minilm-l6-v2 --kind embedding --served-model-name minilm
    sagellm engine start smollm2 --kind openai --engine-url http://127.0.0.1:8080   # a running llama.cpp server
    sagellm engine start Qwen/Qwen2.5-0.5B-Instruct --kind vllm --tp 2 --use-gpu   # vLLM's server, started here
    sagellm engine start model.gguf --kind llamacpp --engine-args="--ctx-size 8192"
    sagellm engine stop llm-1 [--force]

A vllm, sglang or llamacpp engine is that project's own server, run by the gateway as it runs ours (its program:
$SAGELLM_VLLM, $SAGELLM_SGLANG or $SAGELLM_LLAMACPP where the gateway runs, else on PATH: the operator's to name, not
a request's; --engine-args takes the flags that tune it). An openai engine's URL must be in the gateway's
--allowed-upstream. `start` waits until the engine is ready (or failed) unless --no-wait. Requests for the engine's
model at the gateway then reach it (a generation engine is one more instance route chooses among). The gateway is the
one `sagellm gateway start` recorded, or --url."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from sagellm.cli.engine_flags import add_engine_arguments, engine_settings
from sagellm.cli.gateway_client import ManagementClient, add_connection_arguments, engines_table, failures


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="list, start and stop the gateway's engines",
                       description=__doc__.split("\n\n")[0])  # fmt: skip
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="the graph's engines and the managed ones")
    add_connection_arguments(listing)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=run_list)

    start = actions.add_parser("start", help="start an engine (llm, embedding, vllm, sglang, llamacpp) or register a "
                                             "server (openai)")  # fmt: skip
    start.add_argument("model", help="path, alias or org/name (llm, embedding); the server's model name (openai); "
                                     "the model its server loads (vllm, sglang, llamacpp)")  # fmt: skip
    start.add_argument("--kind", choices=("llm", "embedding", "openai", "vllm", "sglang", "llamacpp"), default="llm",
                       help="our engine (llm, embedding), a server to reach (openai) or a server to start "
                            "(vllm, sglang, llamacpp; default: llm)")  # fmt: skip
    start.add_argument("--label", help="a free-form label shown in lists")
    start.add_argument("--max-concurrent", type=int, help="requests in flight at once; more get 429")
    start.add_argument("--use-gpu", action="store_true", help="run on an NVIDIA GPU")
    start.add_argument("--served-model-name", help="the model name clients send to the gateway (default: MODEL)")
    start.add_argument("--engine-url", help="openai: the server's base URL")
    start.add_argument("--engine-api-key", help="openai: the key the server expects")
    start.add_argument("--engine-args", type=shlex.split, default=[], metavar="ARGS",
                       help='vllm, sglang, llamacpp: more of its own flags, those that tune it '
                            '(--engine-args="--a 1 --b")')  # fmt: skip
    start.add_argument("--no-wait", action="store_true", help="return at once instead of waiting until ready")
    start.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for ready (default 900)")
    add_connection_arguments(start)
    add_engine_arguments(start)
    start.set_defaults(run=run_start)

    stop = actions.add_parser("stop", help="drain then stop a managed engine")
    stop.add_argument("engine_id", metavar="ID", help="the engine's id (see `sagellm engine list`)")
    stop.add_argument("--force", action="store_true", help="kill it now instead of draining its requests")
    add_connection_arguments(stop)
    stop.set_defaults(run=run_stop)


def run_list(args: argparse.Namespace) -> int:
    from rich.console import Console

    engines = ManagementClient.from_args(args).engines()
    if args.json:
        print(json.dumps(engines, indent=2))
    else:
        Console().print(engines_table(engines))
    return 0


def run_start(args: argparse.Namespace) -> int:
    from rich.console import Console

    client = ManagementClient.from_args(args)
    console = Console(stderr=True)
    settings = engine_settings(args)
    body = {
        "model": args.model,
        "kind": args.kind,
        "tensor_parallel": settings.pop("tensor_parallel_size", 1),
        "label": args.label,
        "max_concurrent": args.max_concurrent,
        "use_gpu": args.use_gpu,
        "served_model_name": args.served_model_name,
        "url": args.engine_url,
        "api_key": args.engine_api_key,
        "engine": settings,
        "args": args.engine_args or None,
    }
    engine = client.start_engine(body)
    if not args.no_wait:
        with console.status(f"starting {engine['id']} ({engine['model']}) at {engine['url']}"):
            engine = client.wait_ready([engine["id"]], args.timeout).get(engine["id"], engine)
    Console().print(engines_table([engine], title="engine started"))
    problems = failures([engine]) if not args.no_wait else []
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def run_stop(args: argparse.Namespace) -> int:
    from rich.console import Console

    engine = ManagementClient.from_args(args).stop_engine(args.engine_id, force=args.force)
    Console().print(engines_table([engine], title="engine stopped"))
    return 0
