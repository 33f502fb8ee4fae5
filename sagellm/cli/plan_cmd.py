"""`sagellm plan MODEL`: how to split a model over GPUs (tensor, pipeline, data, expert parallel), with every split
considered and why one is recommended; reads only the model's config, never its weights.

sagellm plan path/to/model                      # this machine's devices (--devices auto): its GPUs, else its CPU
sagellm plan config.json --gpus 8 --gpu-mem 80  # one node of 8 x 80 GiB GPUs
sagellm plan config.json --gpus 32 --gpu-mem 80 --gpus-per-node 8   # or --nodes 4"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from sagellm.common.errors import InvalidInput
from sagellm.runtime.parallel.model_shape import DTYPE_BYTES, ModelShape  # light: no torch; --help stays instant

if TYPE_CHECKING:
    from rich.table import Table

    from sagellm.runtime.parallel.devices import Devices
    from sagellm.runtime.parallel.plan import Alternative


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="recommend how to split a model over GPUs", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model directory, its config.json, a .gguf file, or a cache alias")
    p.add_argument("--devices", choices=["auto"], help="this machine's GPUs, else its CPU (the default)")
    p.add_argument("--gpus", type=int, metavar="N", help="plan for this many GPUs instead (with --gpu-mem)")
    p.add_argument("--gpu-mem", type=float, metavar="GIB", help="memory of each GPU, GiB")
    p.add_argument(
        "--gpus-per-node", type=int, metavar="M", help="GPUs sharing a fast link (NVLink / one node); default 8"
    )
    p.add_argument("--nodes", type=int, metavar="K", help="nodes the GPUs are spread over (instead of --gpus-per-node)")
    p.add_argument(
        "--dtype", choices=list(DTYPE_BYTES), help="of weights and KV cache (default: bf16 on GPUs, fp32 on CPU)"
    )
    p.add_argument(
        "--max-model-len", type=int, metavar="TOKENS", help="tokens of KV cache a replica must hold (default: context)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sagellm.runtime.parallel.plan import PlanError
    from sagellm.runtime.parallel.planner import ParallelismOptimizer

    devices = _devices(args)
    optimizer = ParallelismOptimizer(dtype=args.dtype, kv_tokens=args.max_model_len)
    console = Console()
    try:
        plan = optimizer.recommend_strategy(_model_shape(args.model), devices)
    except PlanError as error:
        console.print(_table(error.alternatives, None))
        raise
    console.print(_table(plan.alternatives, plan.choice))
    console.print(f"[bold]recommended: {plan.config}[/]")
    console.print(plan.explanation, highlight=False)
    return 0


def _model_shape(model: str) -> ModelShape:
    """The model's architecture from its config.json or GGUF metadata, without weights or tokenizer."""
    from sagellm.runtime.models.loader import load_model
    from sagellm.runtime.models.model_cache import resolve_model

    path = Path(model).expanduser()
    if path.name == "config.json" and path.is_file():  # a config.json is its directory's
        path = path.parent
    loaded = load_model(resolve_model(path), load_tokenizer=False, load_weights=False)
    return ModelShape.of(loaded.config, loaded.name)


def _devices(args: argparse.Namespace) -> Devices:
    from sagellm.runtime.parallel.devices import Devices

    described = (args.gpus, args.gpu_mem, args.gpus_per_node, args.nodes)
    if args.devices == "auto" or described == (None, None, None, None):
        if args.devices == "auto" and described != (None, None, None, None):
            raise InvalidInput(
                "--devices auto reads this machine; leave out --gpus, --gpu-mem, --gpus-per-node, --nodes"
            )
        from sagellm.runtime.comm.topology import machine_topology

        return Devices.from_topology(machine_topology())
    if args.gpu_mem is None:
        raise InvalidInput("--gpu-mem GIB is needed to plan for GPUs this machine does not have")
    count, nodes, per_node = args.gpus, args.nodes, args.gpus_per_node
    if count is None:
        if nodes is None and per_node is None:
            raise InvalidInput("--gpu-mem needs --gpus N, or --nodes K with --gpus-per-node M")
        count = (nodes or 1) * (per_node or 8)
    elif nodes is not None:
        if count % nodes or (per_node is not None and per_node * nodes != count):
            raise InvalidInput(f"{count} GPUs do not split into {nodes} nodes of {per_node or 'equal size'}")
        per_node = count // nodes
    return Devices.gpus(count, args.gpu_mem, per_node=per_node or 8)


def _table(alternatives: list[Alternative], choice: Alternative | None) -> Table:
    from rich.table import Table

    from sagellm.runtime.parallel.devices import gib

    table = Table("tp", "pp", "dp", "ep", "weights", "KV", "fits", "note", title="splits (GiB per device)")
    for alternative in alternatives:
        split = alternative.config
        note = "recommended" if alternative is choice else alternative.note
        table.add_row(
            *(str(n) for n in (split.tp, split.pp, split.dp, split.ep)),
            gib(alternative.weights_gib),
            gib(alternative.kv_gib),
            "yes" if alternative.fits else "no",
            note,
            style="bold green" if alternative is choice else None,
        )
    return table
