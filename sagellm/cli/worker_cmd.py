"""`sagellm worker`: run one process group of a pipeline graph on this host, for a graph running on another one.

    sagellm run graphs/pd_remote.yaml --prompt "Hi"                     # on the head host: prints the command below
    sagellm worker --connect tcp://head:5555 --group decode             # on the decode host

The graph places the group `remote:GROUP`. The worker gets the graph from the run over the control socket (no file
to copy), but the model must be on this host too (the same path, or an alias it can download). It exits when the
run ends, or when the run falls silent for its peer timeout.

A run that listens beyond its host encrypts its links and admits only processes holding its key: it writes the key
to a file (mode 0600) and prints the command with `--key-file PATH`; copy that file here over a secure channel (scp)
first. Each run makes a new key."""

from __future__ import annotations

import argparse

from sagellm.runtime.executor.worker_args import add_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run a remote:GROUP of a pipeline graph on this host",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.add_argument("--log-level", default="info", help="debug, info, warning or error (default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import trio

    from sagellm.runtime.executor.worker import serve_args

    trio.run(serve_args, args)
    return 0
