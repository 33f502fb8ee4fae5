"""`sagellm serve`'s options, defined once: `sagellm gateway start` runs `sagellm serve` in the background and
takes the same ones (the engine's own come from `engine_flags`, shared with every command that starts an engine).

Apart from `serve_cmd`, which runs what they ask, so a command or a test can parse serve's command line without
importing how it is served."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Shared with `sagellm gateway start`, which runs `sagellm serve` in the background with the same options."""
    from sagellm.cli.engine_flags import add_engine_arguments
    from sagellm.common.logging import LOG_FORMATS
    from sagellm.gateway.config import DEFAULT_GRAPH, DEFAULT_PORT, ROLES

    p.add_argument(
        "graph",
        nargs="?",
        default=str(DEFAULT_GRAPH),
        metavar="MODEL_OR_GRAPH",
        help="a model (path, .gguf, alias or org/name) on the default graph, or a pipeline YAML / shipped graph name "
        "(default: graphs/colocated.yaml with its model)",
    )
    p.add_argument(
        "--model",
        "-m",
        action="append",
        metavar="[NAME=]MODEL",
        help="the LLM (path, .gguf, alias or org/name; default: the graph's model); NAME=MODEL, repeatable: models "
        "loaded on demand, each served as NAME (MODEL may be a preset of one engine), beside the one given without a "
        "name (the graph's)",
    )
    p.add_argument(
        "--lora-modules",
        nargs="+",
        metavar="NAME=PATH",
        help="LoRA adapters (PEFT directories) of the graph's model, each served as a model named NAME, as vLLM's "
        "flag (with --enable-lora; more at run time: POST /v1/load_lora_adapter); vLLM's JSON form "
        '\'{"name": NAME, "path": PATH, "base_model_name": MODEL}\' names the model on demand it adapts',
    )
    p.add_argument(
        "--max-loaded-models",
        type=int,
        metavar="N",
        help="with NAME=MODEL: models loaded at once; the least recently used idle one makes room (default: as many "
        "as memory allows)",
    )
    p.add_argument(
        "--idle-unload-s",
        type=float,
        metavar="S",
        help="with NAME=MODEL: unload a model no request has used for S seconds (default: only to make room)",
    )
    p.add_argument("--embedding-model", "-e", help="the embedding model (default all-minilm-l6-v2)")
    p.add_argument("--no-embedding", action="store_true", help="serve no embedding model")
    p.add_argument(
        "--pooling-model",
        action="append",
        default=[],
        metavar="MODEL",
        help="also serve this reranker (a cross-encoder), classifier or embedding model for /rerank, /score, "
        "/classify, /pooling and /v1/embeddings (repeatable)",
    )
    p.add_argument("--no-llm", action="store_true", help="serve only the embedding model (no graph, no LLM)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument(
        "--allowed-host",
        action="append",
        dest="allowed_hosts",
        metavar="NAME",
        help="a host name clients address the gateway by (repeat; default: loopback names on loopback, any otherwise)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="the port to listen on (default: %(default)s)")
    p.add_argument("--api-key", action="append", default=None, help="accepted API key (repeat; env SAGELLM_API_KEY)")
    p.add_argument(
        "--api-keys-file",
        type=Path,
        metavar="PATH",
        help="a YAML file of API keys, each with a name and its limits (requests and tokens per minute, concurrent "
        "requests, max_tokens), priority class, allowed models and cache salt; read again when it changes or on "
        "SIGHUP (docs/serving/api-keys.md)",
    )
    p.add_argument("--admin-key", help="admin key for management routes (env SAGELLM_ADMIN_KEY; default: generated)")
    p.add_argument(
        "--access-log",
        type=Path,
        metavar="PATH",
        help="append a JSON line a request to PATH as it ends or is refused (its key's name, model, tokens, timings, "
        "status, trace id), rotated by size into PATH.1 ... PATH.5",
    )
    p.add_argument(
        "--access-log-max-mb", type=float, default=100.0, help="the access log's size before it rotates (default: 100)"
    )
    p.add_argument(
        "--enable-per-request-metrics",
        action="store_true",
        help="each reply of one generation carries vLLM's per-request `metrics` (time to first token, queue, "
        "generation time, mean inter-token latency, tokens/s): chat, completions (the usage chunk when streamed) "
        "and responses",
    )
    p.add_argument(
        "--otlp-traces-endpoint",
        metavar="URL",
        help="export each request's trace (gateway, admission, route, engines, KV transfer, in every process) with "
        "OTLP over HTTP to URL, e.g. http://127.0.0.1:4318/v1/traces (vLLM's flag; needs sagellm[tracing]); a "
        "client's traceparent header is the parent of its request's spans",
    )
    p.add_argument(
        "--admin-auth",
        choices=("key", "loopback"),
        default="key",
        help="key: admin and management routes need the admin key (default); loopback: they need none, for tools that "
        "send none (a gateway bound to loopback only, without --api-hub), except those that start a process, read a "
        "path or add an upstream (engine starts, model and LoRA loads)",
    )
    p.add_argument(
        "--allowed-upstream",
        action="append",
        dest="allowed_upstreams",
        metavar="HOST[:PORT][,...]",
        help="where an openai engine the management API registers (a server joining with --join too) may be: a host "
        "name, an address or a network (10.0.0.0/24; IPv6 in brackets), any port or the one given; comma-separated "
        "or repeated (default: nowhere; link-local and metadata addresses only when listed themselves)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="the model name clients use (default: the model alias or path); more names are aliases it answers to too",
    )
    p.add_argument(
        "--state-dir", type=Path, help="admin key, sessions, pid and log files (default $SAGELLM_HOME/gateway)"
    )
    p.add_argument("--policy", help="scheduling policy of every policy_sort node")
    p.add_argument("--routing", help="strategy of every route node")
    p.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE", help="override a parameter")
    p.add_argument("--max-body-bytes", type=int, help="largest request body accepted (default 8 MiB)")
    p.add_argument(
        "--max-connections",
        type=int,
        help="open connections served at once; more get a 503 (default: the file-descriptor limit less headroom)",
    )
    p.add_argument(
        "--tool-call-parser",
        help="how tool calls are read from the model's replies, as vLLM's flag: hermes, llama3_json or openai "
        "(gpt-oss's Harmony) (default: chosen from the model's chat template)",
    )
    p.add_argument(
        "--reasoning-budget",
        type=int,
        default=-1,
        help="thinking tokens a reasoning model may spend on a request that sets no budget of its own, as llama.cpp's "
        "flag: then its thinking is closed and the answer follows (-1: no bound; 0: no thinking)",
    )
    p.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=[],
        metavar="HOST",
        help="hosts a chat's image_url parts may be fetched from over http(s), as vLLM's flag (default: none; data: "
        "URLs always work); redirects are not followed",
    )
    p.add_argument(
        "--allowed-local-media-path",
        metavar="DIR",
        help="a directory whose files a chat's image_url parts may name (file:// or a path), as vLLM's flag "
        "(default: none)",
    )
    p.add_argument(
        "--reasoning-parser",
        help="how a reasoning model's thinking is read from its replies (reasoning_content, thinking blocks), as "
        "vLLM's flag: qwen3, deepseek_r1 or openai_gptoss (default: openai_gptoss for gpt-oss's Harmony template, "
        "qwen3 for a chat template that writes <think> tags, else none)",
    )
    p.add_argument(
        "--api-servers",
        type=int,
        default=0,
        metavar="N",
        help="N processes answer HTTP on the port (HTTP, JSON, tokenizing) in front of this one, which runs the graph "
        "(default 0: this process does both)",
    )
    p.add_argument(
        "--autoscale",
        metavar="MIN:MAX",
        help="add replicas of a model's engine under load and drain them when idle, from MIN to MAX instances: the "
        "graph's model (its `autoscale:` block sets the rest) and each model on demand while it is loaded",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the Ray cluster the graph's `ray:GROUP` groups run on (`auto`: the one `ray start` made on this host; "
        "default: the graph's `cluster.ray`)",
    )
    p.add_argument(
        "--api-hub",
        metavar="HOST:PORT",
        help="also let API servers on other hosts attach here (`sagellm api-server --core`; encrypted with a key "
        "written for the run, whose path and command are printed)",
    )
    failover = p.add_argument_group("failover (a request whose instance fails is tried again, resumed after tokens)")
    failover.add_argument("--max-retries", type=int, default=2, help="attempts after the first (default 2; 0: off)")
    failover.add_argument(
        "--retry-wait", type=float, default=60.0, help="seconds a retry waits for a healthy instance (default 60)"
    )
    failover.add_argument(
        "--first-token-timeout", type=float, default=300.0, help="seconds to the first token, queue included (300)"
    )
    failover.add_argument("--token-timeout", type=float, default=60.0, help="seconds between two tokens (default 60)")
    failover.add_argument(
        "--queue-timeout",
        type=float,
        help="seconds a request may wait for an engine before it ends with a 503 (default: no limit but the first "
        "token's)",
    )
    pd = p.add_argument_group("disaggregated serving across servers (vLLM's kv_transfer_params; off by default)")
    pd.add_argument(
        "--kv-transfer-role",
        choices=ROLES,
        help="this server's part, as vLLM's kv_role: producer prefills for decode servers elsewhere "
        "(do_remote_decode), consumer decodes from the prefill servers of --kv-transfer-peers (do_remote_prefill), "
        "both does either (default: none: kv_transfer_params that ask either are refused)",
    )
    pd.add_argument(
        "--kv-transfer-peers",
        action="append",
        metavar="HOST:PORT[,...]",
        help="the prefill servers a consumer fetches KV from, as its proxy reaches them (their replies' remote_host "
        "and remote_port; a name also matches the addresses it resolves to at start); comma-separated or repeated",
    )
    join = p.add_argument_group("joining another gateway as one of its instances (sagellm.gateway.control.join)")
    join.add_argument(
        "--join",
        metavar="URL",
        help="the head gateway to join, as the server of each model served here; leaves it (drained) on SIGINT/SIGTERM",
    )
    join.add_argument("--join-key", help="the head's admin key (env SAGELLM_JOIN_KEY)")
    join.add_argument(
        "--advertise-url", help="where the head reaches this server (default: http://HOST:PORT it listens on)"
    )
    add_engine_arguments(p)  # the KV cache mapped ahead of use (--prefault-kv-cache: all of it at start)
    p.add_argument("--log-level", default="info", help="debug, info, warning or error (default: %(default)s)")
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="console: structlog's lines, for a person; json: a JSON object per line, for a log search; auto: console "
        "when stderr is a terminal, else json (default: $SAGELLM_LOG_FORMAT, else auto)",
    )
    p.set_defaults(prompt=[], requests=None, max_tokens=None, temperature=None)
