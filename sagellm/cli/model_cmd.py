"""`sagellm model download|list`: the local model cache."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="download and list cached models", description=__doc__)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = actions.add_parser("download", help="fetch a model into the cache (alias or org/name)")
    d.add_argument("name", nargs="?", default=None, help="default: smollm2-135m-instruct")
    d.add_argument("--force", action="store_true", help="download again even if cached")
    d.set_defaults(run=run_download)
    ls = actions.add_parser("list", help="show the models in the cache")
    ls.set_defaults(run=run_list)


def run_download(args: argparse.Namespace) -> int:
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, download_model

    path = download_model(args.name or DEFAULT_MODEL, force=args.force)
    print(path)
    return 0


def run_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sagellm.runtime.models.model_cache import list_cached_models

    table = Table("name", "format", "size", "path")
    for model in list_cached_models():
        table.add_row(model.name, model.format, f"{model.size_bytes / 2**20:.1f} MiB", str(model.path))
    Console().print(table)
    return 0
