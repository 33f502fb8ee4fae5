"""`sagellm serve [GRAPH]`: the OpenAI-compatible gateway in the foreground, on a pipeline graph.

    sagellm serve                                   # graphs/colocated.yaml, SmolLM2 + all-MiniLM-L6-v2
    sagellm serve graphs/pd.yaml --port 8001 --api-key sk-local --no-embedding
    sagellm serve --no-llm -e all-minilm-l6-v2 --port 8002   # embeddings only (an `embedding` engine)

The graph's sources are replaced by the HTTP source and its printing sinks dropped (see sagellm.gateway.core).
Models that are known aliases are downloaded first. Ctrl-C or SIGTERM stop it gracefully."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the OpenAI-compatible gateway (foreground)", description=__doc__.split("\n\n")[0]
    )
    add_serve_arguments(p)
    p.set_defaults(run=run)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Shared with `sagellm gateway start`, which runs `sagellm serve` in the background with the same options."""
    from sagellm.gateway.config import DEFAULT_GRAPH, DEFAULT_PORT

    p.add_argument("graph", nargs="?", default=str(DEFAULT_GRAPH), help="pipeline YAML (default graphs/colocated.yaml)")
    p.add_argument("--model", "-m", help="the LLM (path, .gguf, alias or org/name; default: the graph's model)")
    p.add_argument("--embedding-model", "-e", help="the embedding model (default all-minilm-l6-v2)")
    p.add_argument("--no-embedding", action="store_true", help="serve no embedding model")
    p.add_argument("--no-llm", action="store_true", help="serve only the embedding model (no graph, no LLM)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument(
        "--allowed-host",
        action="append",
        dest="allowed_hosts",
        metavar="NAME",
        help="a host name clients address the gateway by (repeat; default: loopback names on loopback, any otherwise)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-key", action="append", default=None, help="accepted API key (repeat; env SAGELLM_API_KEY)")
    p.add_argument("--admin-key", help="admin key for management routes (env SAGELLM_ADMIN_KEY; default: generated)")
    p.add_argument("--served-model-name", help="the model name clients use (default: the model alias or path)")
    p.add_argument(
        "--state-dir", type=Path, help="admin key, sessions, pid and log files (default $SAGELLM_HOME/gateway)"
    )
    p.add_argument("--policy", help="scheduling policy of every policy_sort node")
    p.add_argument("--routing", help="strategy of every route node")
    p.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE", help="override a parameter")
    p.add_argument("--max-body-bytes", type=int, help="largest request body accepted (default 8 MiB)")
    failover = p.add_argument_group("failover (a request whose instance fails is tried again, resumed after tokens)")
    failover.add_argument("--max-retries", type=int, default=2, help="attempts after the first (default 2; 0: off)")
    failover.add_argument(
        "--retry-wait", type=float, default=60.0, help="seconds a retry waits for a healthy instance (default 60)"
    )
    failover.add_argument(
        "--first-token-timeout", type=float, default=300.0, help="seconds to the first token, queue included (300)"
    )
    failover.add_argument("--token-timeout", type=float, default=60.0, help="seconds between two tokens (default 60)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(prompt=[], requests=None, max_tokens=None, temperature=None)


def run(args: argparse.Namespace) -> int:
    import trio

    from sagellm.cli.run_cmd import build_graph
    from sagellm.gateway.server import serve
    from sagellm.runtime.models.model_cache import DEFAULT_EMBEDDING_MODEL, resolve_model

    embedding = None if args.no_embedding else (args.embedding_model or DEFAULT_EMBEDDING_MODEL)
    if args.no_llm:
        return _serve_embeddings_only(args, embedding)
    graph = build_graph(args)
    for model in (graph.attrs.get("model"), embedding):
        if model:
            resolve_model(model)  # download once, before any worker process looks for it
    config = _config(args, embedding)
    trio.run(lambda: serve(graph, config, handle_signals=True))
    return 0


def _config(args: argparse.Namespace, embedding: str | None) -> Any:
    from sagellm.gateway.config import FailoverPolicy, GatewayConfig

    failover = FailoverPolicy(
        max_retries=args.max_retries,
        retry_wait_s=args.retry_wait,
        first_token_timeout_s=args.first_token_timeout,
        token_timeout_s=args.token_timeout,
    )
    return GatewayConfig.from_env(
        failover=failover,
        host=args.host,
        port=args.port,
        api_keys=args.api_key,
        admin_key=args.admin_key,
        embedding_model=embedding,
        served_model_name=args.served_model_name,
        state_dir=args.state_dir,
        max_body_bytes=args.max_body_bytes,
        allowed_hosts=args.allowed_hosts,
    )


def _serve_embeddings_only(args: argparse.Namespace, embedding: str | None) -> int:
    """`--no-llm`: the embedding model alone (an `embedding` engine of the control plane), on the graph with no
    engine of its own."""
    import trio

    from sagellm import graphs
    from sagellm.gateway.server import serve
    from sagellm.runtime.models.model_cache import resolve_model
    from sagellm.runtime.pipeline.yaml_io import load_pipeline

    if embedding is None:
        raise ValueError("--no-llm with --no-embedding leaves nothing to serve")
    resolve_model(embedding)
    graph = load_pipeline(graphs.find("control_plane"))
    trio.run(lambda: serve(graph, _config(args, embedding), handle_signals=True))
    return 0
