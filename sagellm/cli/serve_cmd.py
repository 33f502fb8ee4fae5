"""`sagellm serve [MODEL_OR_GRAPH]`: the OpenAI-compatible gateway in the foreground, on a model or a pipeline graph.

    sagellm serve                                   # graphs/colocated.yaml, SmolLM2 + all-MiniLM-L6-v2
    sagellm serve smollm2-135m-instruct --max-model-len 2048 --max-num-seqs 8   # a model, vLLM's flags
    sagellm serve graphs/pd.yaml --port 8001 --api-key sk-local --no-embedding
    sagellm serve --no-llm -e all-minilm-l6-v2 --port 8002   # embeddings only (an `embedding` engine)
    sagellm serve --pooling-model ./ms-marco-MiniLM-L6-v2   # and a reranker: /rerank, /v2/rerank, /score
    sagellm serve --host 0.0.0.0 --join http://head:8000 --join-key ADMIN_KEY   # one more instance of the head's
    sagellm serve --model chat=smollm2-135m-instruct --model big=./qwen3.gguf --max-loaded-models 1 --idle-unload-s 600

A model (a path, a .gguf file, an alias or a hub id) is served on the default graph (colocated: one engine); a .yaml
file or a shipped graph's name is served as that graph. The engine flags (vLLM's names: `--max-model-len`,
`--max-num-seqs`, `--max-num-batched-tokens`, `--enable-prefix-caching`, ...) set every engine node of the graph, with
the same checks as the graph file. `--model NAME=MODEL`, repeated, serves each model as NAME, loaded when a request
first names it and evicted or unloaded as `--max-loaded-models`, the memory and `--idle-unload-s` say
(sagellm.gateway.control.model_pool); the engine flags set each. Beside them, a model given without a name or a graph
file is the graph's own, always loaded. The graph's sources are replaced by the HTTP source
and its printing sinks dropped (see sagellm.gateway.serving.core). Models that are known aliases are downloaded
first. Ctrl-C or SIGTERM stop it gracefully."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from sagellm.cli.serve_flags import add_serve_arguments
from sagellm.common.errors import FieldError, InvalidInput, NotFound


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the OpenAI-compatible gateway (foreground)", description=__doc__.split("\n\n")[0]
    )
    add_serve_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import trio

    from sagellm.common.logging import LOG_FORMAT_ENV
    from sagellm.gateway.http.port import check_port_free
    from sagellm.runtime.models.model_cache import DEFAULT_EMBEDDING_MODEL

    check_port_free(args.host, args.port)  # before anything loads: a port in use is said at once, in one line
    if args.log_format:
        os.environ[LOG_FORMAT_ENV] = args.log_format  # the workers, API servers and engines log as this process does
    embedding = None if args.no_embedding else (args.embedding_model or DEFAULT_EMBEDDING_MODEL)
    on_demand = _models_on_demand(args)
    if on_demand is not None and not _graph_model_given(args):
        return _serve_on_demand(args, embedding, on_demand)
    on_demand = _checked_on_demand(args, on_demand, embedding) if on_demand is not None else None
    if args.no_llm:
        return _serve_embeddings_only(args, embedding)
    graph, config = graph_and_config(args, embedding)
    config.models_on_demand = on_demand
    trio.run(_serve_showing_progress, graph, config, args.api_servers)
    return 0


def graph_and_config(args: argparse.Namespace, embedding: str | None) -> tuple[Any, Any]:
    """The graph `sagellm serve` runs for its model or graph argument, with the engine flags applied, and the
    gateway's settings; the models fetched first (`sagellm run-batch` serves the same)."""
    from sagellm.cli.run_cmd import build_graph

    _model_or_graph(args)
    _fetch(args.model, embedding, *args.pooling_model)  # before the graph is built: it imports torch (5-10 s)
    graph = apply_autoscale(apply_engine_settings(build_graph(args), args), args.autoscale)
    if args.ray_address:
        graph.attrs["cluster"] = {**graph.attrs.get("cluster", {}), "ray": args.ray_address}
    _fetch(graph.attrs.get("model"))  # a graph file's own model
    return graph, _config(args, embedding, _first(args.served_model_name) or str(graph.attrs.get("model") or "default"))


def apply_autoscale(graph: Any, bounds: str | None) -> Any:
    """`--autoscale MIN:MAX` into the graph's `autoscale:` settings (the rest kept), checked as the file's are."""
    if bounds is None:
        return graph
    from sagellm.common.autoscale import instance_bounds
    from sagellm.runtime.pipeline.spec import validate

    graph.attrs["autoscale"] = {**graph.attrs.get("autoscale", {}), **instance_bounds(bounds)}
    return validate(graph, graph.attrs.get("_locations"), file=graph.attrs.get("_file"))


def _models_on_demand(args: argparse.Namespace) -> Any:
    """`--model NAME=MODEL ...` as the gateway's models on demand (None: one model, or none, given the usual way,
    left in `args.model`)."""
    from sagellm.gateway.config import ModelsOnDemand

    given = args.model if isinstance(args.model, list) else [args.model] if args.model else []
    named = [m for m in given if "=" in m and not Path(m).exists()]
    unnamed = [m for m in given if m not in named]
    if len(unnamed) > 1:
        raise InvalidInput("several --model: give each as NAME=MODEL to serve them on demand (one model without a "
                           "name is the graph's own)")  # fmt: skip
    args.model = unnamed[0] if unnamed else None
    if not named:
        if args.max_loaded_models is not None or args.idle_unload_s is not None:
            raise InvalidInput("--max-loaded-models and --idle-unload-s are for models given as --model NAME=MODEL")
        return None
    pairs = [m.split("=", 1) for m in named]
    models = dict(pairs)
    if len(models) < len(pairs):
        raise InvalidInput("--model NAME=MODEL: each NAME once")
    return ModelsOnDemand(models, max_loaded=args.max_loaded_models, idle_unload_s=args.idle_unload_s)


def _graph_model_given(args: argparse.Namespace) -> bool:
    """Whether the graph serves a model of its own beside the models on demand: one given without a name, as the
    positional argument or a --model, or a graph file."""
    from sagellm.gateway.config import DEFAULT_GRAPH

    return args.model is not None or args.graph != str(DEFAULT_GRAPH)


def _serve_on_demand(args: argparse.Namespace, embedding: str | None, on_demand: Any) -> int:
    """`--model NAME=MODEL ...` alone: the models loaded on demand, each an engine of the control plane, on the graph
    with no engine of its own (with the embedding model unless --no-embedding)."""
    import trio

    from sagellm import graphs
    from sagellm.runtime.pipeline.yaml_io import load_pipeline

    if args.served_model_name:
        raise InvalidInput("--model NAME=MODEL: --served-model-name is for the graph's own model, and no model "
                           "without a name or graph file gives one")  # fmt: skip
    on_demand = _checked_on_demand(args, on_demand, embedding)
    graph = load_pipeline(graphs.find("control_plane"))
    config = _config(args, embedding, next(iter(on_demand.models)))
    config.models_on_demand = on_demand
    trio.run(_serve_showing_progress, graph, config, 0)
    return 0


def _checked_on_demand(args: argparse.Namespace, on_demand: Any, embedding: str | None) -> Any:
    """The models on demand (a preset's engine where one is named) with the engine flags, checked, their files
    fetched (a request then waits only for the load); InvalidInput for a flag they are not served with yet."""
    import dataclasses

    from sagellm.cli.engine_flags import engine_settings
    from sagellm.common.autoscale import instance_bounds

    if args.no_llm:
        raise InvalidInput("--model NAME=MODEL: --no-llm serves embeddings alone, no model on demand")
    models = {name: _preset_engine(name, source) or source for name, source in on_demand.models.items()}
    try:
        scaling = instance_bounds(args.autoscale) if args.autoscale else None
        on_demand = dataclasses.replace(on_demand, models=models, engine=engine_settings(args), autoscale=scaling)
        on_demand.check()
    except FieldError as error:
        raise InvalidInput(f"--model NAME=MODEL: {error}") from None
    ours = [m if isinstance(m, str) else m["model"] for m in models.values() if isinstance(m, str) or
            m.get("kind", "llm") == "llm"]  # fmt: skip
    _fetch(*ours, embedding, *args.pooling_model)
    return on_demand


def _preset_engine(name: str, source: str) -> dict[str, Any] | None:
    """The engine a preset (a built-in one's name, or a preset file) holds for `--model NAME=PRESET`, as
    `EngineSpec`'s fields; None when `source` names a model. InvalidInput for a preset that is not one generation
    engine."""
    import msgspec

    from sagellm.presets import builtin_presets, load_preset

    path = Path(source)
    if not (source.endswith((".yaml", ".yml")) and path.is_file()) and source not in builtin_presets():
        return None
    preset = load_preset(path if path.is_file() else builtin_presets()[source])
    engines = [e for e in preset.engines if e.kind != "embedding"]
    if len(preset.engines) != 1 or not engines:
        held = ", ".join(f"{e.name} ({e.kind})" for e in preset.engines)
        raise InvalidInput(f"--model {name}={source}: a preset served as a model holds one generation engine; "
                           f"{preset.name} holds {held}")  # fmt: skip
    fields = msgspec.structs.asdict(engines[0].spec())
    del fields["served_model_name"]  # the NAME it is served as
    return fields


def _model_or_graph(args: argparse.Namespace) -> None:
    """The positional argument names a graph (a .yaml file, or a shipped graph's name) or else a model, served on the
    default graph (a model given both ways is an error: which one was meant?)."""
    from sagellm import graphs
    from sagellm.gateway.config import DEFAULT_GRAPH
    from sagellm.runtime.models.model_cache import ALIASES

    if isinstance(args.model, list):  # as parsed: the one model without a name is the graph's
        _models_on_demand(args)
    target = Path(args.graph)
    if target.suffix in (".yaml", ".yml") or graphs.find(args.graph).suffix in (".yaml", ".yml"):
        return
    if args.model:
        raise InvalidInput(f"{args.graph!r} is not a graph file, and --model names the model: give one or the other")
    meant = graphs.likely_meant_graph(args.graph)
    if meant and not target.exists() and args.graph not in ALIASES and "/" not in args.graph:  # no model: a typo
        raise NotFound(f"{args.graph}: no such model or shipped graph; did you mean the graph {meant}?")
    args.model, args.graph = args.graph, str(DEFAULT_GRAPH)


def apply_engine_settings(graph: Any, args: argparse.Namespace) -> Any:
    """Sets the engine flags given on every node whose operator takes them (the engines), checked as the graph file's
    own values are."""
    from sagellm.cli.engine_flags import engine_settings
    from sagellm.runtime.pipeline.operator import get_operator
    from sagellm.runtime.pipeline.spec import validate

    settings = engine_settings(args)
    engines = [n for n in graph.nodes.values() if set(settings) <= set(get_operator(n.op).parameters())]
    given = [name for name in args._engine_flags if getattr(args, name, None) is not None]
    if not engines and given:  # serve's own defaults alone are no error: a graph may have no engine
        raise InvalidInput(f"{args.graph}: the graph has no engine node to take {', '.join(given)}")
    if not engines:
        return graph
    for node in engines:
        node.params.update(settings)
    return validate(graph, graph.attrs.get("_locations"), file=graph.attrs.get("_file"))


def _first(names: list[str] | None) -> str | None:
    return names[0] if names else None


def _config(args: argparse.Namespace, embedding: str | None, model: str) -> Any:
    """The gateway's settings; `model`: the name it serves its generation model (its embedding model's without one)."""
    from sagellm.gateway.config import FailoverPolicy, GatewayConfig

    failover = FailoverPolicy(
        max_retries=args.max_retries,
        retry_wait_s=args.retry_wait,
        first_token_timeout_s=args.first_token_timeout,
        token_timeout_s=args.token_timeout,
        queue_timeout_s=args.queue_timeout,
    )
    lora_modules, lora_bases = _lora_modules(args.lora_modules)
    return GatewayConfig.from_env(
        failover=failover,
        lora_modules=lora_modules,
        lora_bases=lora_bases,
        join=_join_settings(args, model) if args.join else None,
        host=args.host,
        port=args.port,
        api_keys=args.api_key,
        api_keys_file=args.api_keys_file,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        access_log=args.access_log,
        access_log_max_mb=args.access_log_max_mb,
        per_request_metrics=args.enable_per_request_metrics,
        admin_key=args.admin_key,
        embedding_model=embedding,
        pooling_models=args.pooling_model,
        served_model_name=_first(args.served_model_name),
        model_aliases=(args.served_model_name or [])[1:],
        state_dir=args.state_dir,
        max_body_bytes=args.max_body_bytes,
        max_connections=args.max_connections,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        reasoning_budget=args.reasoning_budget if args.reasoning_budget >= 0 else None,
        allowed_media_domains=args.allowed_media_domains,
        allowed_local_media_path=args.allowed_local_media_path,
        allowed_hosts=args.allowed_hosts,
        api_hub=args.api_hub,
        admin_auth=args.admin_auth,
        allowed_upstreams=[h.strip() for given in args.allowed_upstreams or () for h in given.split(",") if h.strip()],
        kv_transfer=_kv_transfer(args),
    )


def _kv_transfer(args: argparse.Namespace) -> Any:
    """`--kv-transfer-role` and `--kv-transfer-peers` as the gateway's settings (None: neither given), checked."""
    from sagellm.gateway.config import KVTransferSettings

    if args.kv_transfer_role is None and not args.kv_transfer_peers:
        return None
    if args.kv_transfer_role is None:
        raise InvalidInput("--kv-transfer-peers lists the prefill servers a consumer fetches KV from: give "
                           "--kv-transfer-role consumer (or both) too")  # fmt: skip
    if args.api_servers:
        raise InvalidInput("--kv-transfer-role: PD across servers is served by a gateway that answers HTTP itself; "
                           "drop --api-servers")  # fmt: skip
    peers = tuple(peer.strip() for given in args.kv_transfer_peers or () for peer in given.split(",") if peer.strip())
    return KVTransferSettings(args.kv_transfer_role, peers)


def _lora_modules(given: list[str] | None) -> tuple[dict[str, str], dict[str, str]]:
    """`--lora-modules NAME=PATH ...` (or vLLM's JSON form of one, with its `base_model_name`) -> each adapter's path,
    and the base model of those that name one, by the adapter's name."""
    modules: dict[str, str] = {}
    bases: dict[str, str] = {}
    for item in given or ():
        name, path, base = _lora_module(item)
        if name in modules:
            raise InvalidInput("--lora-modules: each NAME once")
        modules[name] = path
        if base is not None:
            bases[name] = base
    return modules, bases


def _lora_module(item: str) -> tuple[str, str, str | None]:
    if item.lstrip().startswith("{"):
        import json

        try:
            fields = json.loads(item)
        except ValueError as error:
            raise InvalidInput(f"--lora-modules: {item}: not valid JSON ({error})") from None
        unknown = sorted(set(fields) - {"name", "path", "base_model_name"}) if isinstance(fields, dict) else []
        if not isinstance(fields, dict) or unknown or not fields.get("name") or not fields.get("path"):
            raise InvalidInput(f"--lora-modules: {item}: give {{\"name\", \"path\"}} and optionally \"base_model_name\""
                               + (f" (not {', '.join(unknown)})" if unknown else ""))  # fmt: skip
        return str(fields["name"]), str(fields["path"]), fields.get("base_model_name")
    name, equals, path = item.partition("=")
    if not equals or not name or not path:
        raise InvalidInput(f"--lora-modules: give each adapter as NAME=PATH, got {item}")
    return name, path, None


def _join_settings(args: argparse.Namespace, model: str) -> Any:
    """What `--join` asks: this server's `model` (the name it serves) as one more instance of the head's, reached at
    `--advertise-url` or where it listens (0.0.0.0: this host's name)."""
    import os
    import socket

    from sagellm.gateway.config import API_KEY_ENV, JOIN_KEY_ENV, JoinSettings

    host = socket.gethostname() if args.host in ("0.0.0.0", "::") else args.host
    url = args.advertise_url or (f"http://{host}:{args.port}" if args.port else None)
    keys = args.api_key or [k for k in os.environ.get(API_KEY_ENV, "").split(",") if k]
    return JoinSettings(
        gateway=args.join, model=model, url=url, admin_key=args.join_key or os.environ.get(JOIN_KEY_ENV),
        api_key=keys[0] if keys else None, label=socket.gethostname(),
    )  # fmt: skip


def _fetch(*models: str | None) -> None:
    """Downloads the models not cached yet, once, before any worker process looks for them, saying so as the rest of
    start-up is said (a path that is not there is an error here, before anything loads)."""
    from sagellm.cli.progress_display import showing_progress
    from sagellm.runtime.models.model_cache import resolve_model

    with showing_progress("sagellm serve"):
        for model in models:
            if model:
                resolve_model(model)


async def _serve_showing_progress(graph: Any, config: Any, api_servers: int = 0) -> None:
    """The gateway until it stops, saying what its start-up waits for until it answers, then where it answers."""
    from functools import partial

    import trio

    from sagellm.cli.progress_display import showing_progress
    from sagellm.gateway.server import serve

    async with trio.open_nursery() as nursery:
        with showing_progress("sagellm serve"):
            gateway = await nursery.start(partial(serve, graph, config, handle_signals=True, api_servers=api_servers))
        _say_ready(gateway.url, gateway.core.models())


def _say_ready(url: str, models: list[str]) -> None:
    """One plain line once the gateway answers: where, what, how long start-up took and how to stop it. From then on
    the Hugging Face hub (a LoRA adapter fetched at run time) draws no progress bar into the log."""
    from huggingface_hub.utils import disable_progress_bars

    from sagellm.cli.progress_display import seconds_since_start

    served = ", ".join(models) or "no model yet"
    print(f"sagellm serve: serving {served} on {url} (ready in {seconds_since_start():.1f} s; Ctrl-C to stop)",
          file=sys.stderr, flush=True)  # fmt: skip
    disable_progress_bars()


def _serve_embeddings_only(args: argparse.Namespace, embedding: str | None) -> int:
    """`--no-llm`: the embedding model alone (an `embedding` engine of the control plane), on the graph with no
    engine of its own."""
    import trio

    from sagellm import graphs
    from sagellm.operators.embedding import served_name
    from sagellm.runtime.pipeline.yaml_io import load_pipeline

    if embedding is None and not args.pooling_model:
        raise InvalidInput("--no-llm with --no-embedding leaves nothing to serve")
    if args.join:
        raise InvalidInput("--join adds a generation server to another gateway; an embeddings-only one cannot join")
    if args.autoscale:
        raise InvalidInput("--autoscale adds replicas of a generation engine; --no-llm serves none")
    _fetch(embedding, *args.pooling_model)
    graph = load_pipeline(graphs.find("control_plane"))
    config = _config(args, embedding, _first(args.served_model_name) or served_name(embedding or args.pooling_model[0]))
    trio.run(_serve_showing_progress, graph, config, args.api_servers)
    return 0
