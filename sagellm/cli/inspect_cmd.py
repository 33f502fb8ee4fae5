"""`sagellm inspect MODEL`: the model's execution graph before and after the optimization passes."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="print a model's graph before and after passes", description=__doc__)
    p.add_argument("model", nargs="?", default=None, help="path, .gguf file or cache alias")
    p.add_argument("--layers", type=int, default=1, help="decoder layers to print in full (0 = all)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sagellm.runtime.execution_graph.passes import optimize, plan_buffers
    from sagellm.runtime.models.decoder_graph import build_decoder_graph
    from sagellm.runtime.models.loader import load_model
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

    console = Console()
    config = load_model(resolve_model(args.model or DEFAULT_MODEL), load_tokenizer=False, load_weights=False).config
    console.print(
        f"[bold]{config.architecture}[/]: {config.num_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_heads}/{config.num_kv_heads} heads of {config.head_dim}, vocab {config.vocab_size}"
        + (
            f"; full attention {config.full_num_kv_heads or config.num_kv_heads} KV heads of {config.full_head_dim}"
            if config.full_head_dim
            else ""
        )  # fmt: skip
    )
    before = build_decoder_graph(config)
    after = optimize(before)
    table = Table("op", "before passes", "after passes")
    b, a = before.op_counts(), after.op_counts()
    for op in sorted(set(b) | set(a)):
        table.add_row(op, str(b.get(op, 0)), str(a.get(op, 0)))
    table.add_row("[bold]nodes[/]", str(len(before.nodes)), str(len(after.nodes)))
    slots_before = plan_buffers(before).attrs["num_slots"]
    table.add_row("[bold]buffer slots[/]", str(slots_before), str(after.attrs["num_slots"]))
    console.print(table)
    shown = config if args.layers == 0 else config.first_layers(args.layers)
    small = build_decoder_graph(shown)
    for title, graph in (("before passes", small), ("after passes", optimize(small))):
        console.rule(f"{title} ({shown.num_layers} of {config.num_layers} layers)")
        console.print(graph.pretty(), markup=False, highlight=False, soft_wrap=True)
    return 0
