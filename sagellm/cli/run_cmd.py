"""`sagellm run GRAPH`: run a pipeline graph (YAML) on prompts or a JSONL file of requests, then print its metrics.

    sagellm run graphs/pd.yaml --prompt "What is the capital of France?"
    sagellm run graphs/colocated.yaml --requests reqs.jsonl --output results.jsonl --policy priority
    sagellm run graphs/pd.yaml --prompt "Hi" --sage     # the same graph as a SAGE job (PyPI isage)

Replies stream to stdout; the metrics table and logs go to stderr. The graph's model (default SmolLM2) is
downloaded first if it is a known alias not yet in the cache. Exit status: 0 when every request finished, 1 when any
failed (the count by error code is said) or the run failed once started (a worker that did not start), 2 for a bad
graph, model or command line, something missing here (a backend), or no request at all."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sagellm.common.errors import InvalidInput, users_file

REQUESTS_FORMAT = """\
--requests FILE.jsonl: one request per line, a JSON object with exactly one of
  prompt (text), messages (OpenAI chat messages: the model's chat template renders them) or prompt_token_ids,
and optionally request_id, the sampling fields max_tokens, temperature, top_p, top_k, min_p, seed, stop,
stop_token_ids, ignore_eos, logprobs (left out: --max-tokens/--temperature, else the model's defaults), guided
(the output's constraint: one of {"json": SCHEMA}, {"regex": ...}, {"choice": [...]}, {"grammar": ...},
{"json_object": true}), and the scheduling fields priority (lower first), user, ttft_slo_ms, tpot_slo_ms,
deadline_s (from when the line is read), cost_budget. An unknown key is an error naming it. For example:
  {"prompt": "Hello", "max_tokens": 32}
  {"messages": [{"role": "user", "content": "Name three rivers."}], "temperature": 0, "priority": 0}
  {"prompt": "Is the sky blue?", "guided": {"choice": ["yes", "no"]}}
The results (--output, default FILE.results.jsonl): request_id, text, token_ids, finish_reason or error, metrics."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a pipeline graph (YAML)",
        description=__doc__.split("\n\n")[0],
        epilog=REQUESTS_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("graph", help="a pipeline YAML file, or a shipped graph by name (pd, graphs/pd.yaml)")
    p.add_argument("--prompt", "-p", action="append", default=[], help="a user message (repeat for several)")
    p.add_argument("--requests", help="a JSONL file of requests, one JSON object per line (the format: below)")
    p.add_argument("--output", "-o", help="write one JSON line per request here (default with --requests)")
    p.add_argument("--model", "-m", help="override the graph's model (path, .gguf or alias)")
    p.add_argument("--max-tokens", type=int, help="the requests' max_tokens (default: up to the context)")
    p.add_argument(
        "--temperature", type=float, help="the requests' temperature, 0 = greedy (default: the model's, else 1)"
    )
    p.add_argument("--policy", help="scheduling policy of every policy_sort node (fifo, priority, slo_aware, ...)")
    p.add_argument("--routing", help="strategy of every route node (load_balanced, round_robin, cache_aware, ...)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE", help="override a parameter")
    p.add_argument(
        "--sage", action="store_true", help="run it as a SAGE job (SAGE moves the items; every node in this process)"
    )
    p.add_argument("--log-level", default="warning", help="debug, info, warning or error (default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sagellm.cli.progress_display import seconds_since_start, showing_progress

    with showing_progress("sagellm run"):
        _ensure_model(args.model)  # first: a path that is not there is said before torch is imported (5-10 s)
    from sagellm.runtime.executor.run import run_pipeline
    from sagellm.runtime.pipeline.metrics import render_metrics_table

    graph = build_graph(args)
    with showing_progress("sagellm run"):
        _ensure_model(graph.attrs.get("model"))
    print(f"sagellm run: {_starting(graph, sage=args.sage)}", file=sys.stderr, flush=True)

    starting = ExitStack()
    starting.enter_context(showing_progress("sagellm run"))

    def ready() -> None:
        starting.close()  # the progress display ends before the replies start
        print(f"sagellm run: ready in {seconds_since_start():.1f} s; requests flow", file=sys.stderr, flush=True)

    with starting:  # closed here too when the start fails
        if args.sage:
            from sagellm.sage import from_graph

            result = from_graph(graph).run(on_ready=ready)
        else:
            result = run_pipeline(graph, on_ready=ready)
    if args.output or args.requests:
        path = Path(args.output or Path(args.requests).with_suffix(".results.jsonl"))
        _write_results(result, path)
        print(f"results: {path}", file=sys.stderr)
    sys.stdout.flush()
    snapshot = result.metrics()
    if snapshot is not None:
        Console(stderr=True).print(render_metrics_table(snapshot))
    if not result.outcomes:
        raise InvalidInput(
            f"{args.graph}: no request ran: give --prompt TEXT, --requests FILE.jsonl, or prompts in the graph's source"
        )
    failed = [o.error.code for o in result.outcomes.values() if o.error is not None]
    if failed:
        codes = ", ".join(f"{code} ×{n}" for code, n in Counter(failed).most_common())
        print(f"sagellm run: {len(failed)} of {len(result.outcomes)} requests failed ({codes})", file=sys.stderr)
        return 1
    return 0


def build_graph(args: argparse.Namespace) -> Any:
    """The graph file with the command line applied: the source replaced by the given prompts or request file,
    `--policy`/`--routing` on every node of that kind, then `--set` (validated like the file)."""
    from sagellm import graphs
    from sagellm.runtime.pipeline.spec import validate
    from sagellm.runtime.pipeline.yaml_io import load_pipeline

    graph = load_pipeline(graphs.existing(args.graph), overrides=_overrides(args.set))
    if args.model:
        graph.attrs["model"] = args.model
    if getattr(args, "mmproj", None):  # a GGUF model's vision encoder: every node that reads the model reads it
        graph.attrs["mmproj"] = args.mmproj
    if getattr(args, "language_model_only", None):  # and so does every node that reads its config
        graph.attrs["language_model_only"] = True
    sources = [n for n in graph.nodes.values() if n.op in ("prompt_source", "jsonl_source", "stdin_source")]
    if (args.prompt or args.requests) and len(sources) != 1:
        raise InvalidInput(f"{args.graph}: --prompt/--requests need exactly one source node, found {len(sources)}")
    defaults = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature)) if v is not None}
    for source in sources:
        if args.requests:
            source.op, source.params = "jsonl_source", {"path": args.requests, **defaults}
        elif args.prompt:
            source.op, source.params = "prompt_source", {**source.params, "prompts": args.prompt, **defaults}
        else:
            source.params.update(defaults)
    for node in graph.nodes.values():
        if args.policy and node.op == "policy_sort":
            node.params["policy"] = args.policy
        if args.routing and node.op == "route":
            node.params["strategy"] = args.routing
    return validate(graph, graph.attrs.get("_locations"), file=graph.attrs.get("_file"))


def _overrides(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--set {pair!r}: expected NODE.PARAM=VALUE")
        overrides[key] = value
    return overrides


def _starting(graph: Any, *, sage: bool = False) -> str:
    """What start-up waits for, said before it (loading a model takes seconds, in every process that runs one)."""
    from sagellm.runtime.pipeline.spec import MAIN, placement_group

    groups = sorted({placement_group(n.id, n.placement)[1] for n in graph.nodes.values()} - {MAIN})
    model = graph.attrs.get("model") or "the graph's models"
    if sage:
        return f"loading {model}; then a SAGE job runs every node in this process"
    if groups:
        return f"starting {len(groups)} worker process(es) ({', '.join(groups)}); each loads {model}"
    return f"loading {model}"


def _ensure_model(model: str | None) -> None:
    """Downloads a known model that is not cached yet, once, before any worker process looks for it."""
    from sagellm.runtime.models.model_cache import resolve_model

    if model:
        resolve_model(model)


def _write_results(result: Any, path: Path) -> None:
    with users_file(path, "write the results"):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for rid, o in sorted(result.outcomes.items()):
                line: dict[str, Any] = {"request_id": rid, "text": o.text, "token_ids": o.token_ids}
                if o.error is not None:
                    line["error"] = {"code": o.error.code, "message": o.error.message, "retryable": o.error.retryable}
                else:
                    line["finish_reason"] = o.finish_reason
                if o.metrics is not None:
                    line["metrics"] = o.metrics.to_dict()
                f.write(json.dumps(line) + "\n")
