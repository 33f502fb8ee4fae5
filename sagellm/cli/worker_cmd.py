"""`sagellm worker`: run one process group of a pipeline graph on this host, for a graph running on another one.

    sagellm run graphs/pd_remote.yaml --prompt "Hi"                     # on the head host: prints the command below
    sagellm worker --connect tcp://head:5555 --group decode             # on the decode host

The graph places the group `remote:GROUP`. The worker gets the graph from the run over the control socket (no file
to copy), but the model must be on this host too (the same path, or an alias it can download). It exits when the
run ends, or when the run falls silent for its peer timeout."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run a remote:GROUP of a pipeline graph on this host",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.add_argument("--log-level", default="info")
    p.set_defaults(run=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's options, shared with the command line the parent spawns its own workers with."""
    parser.add_argument("--connect", required=True, metavar="ENDPOINT", help="the control endpoint the run printed")
    parser.add_argument("--group", required=True, help="the process group to run (its placement: remote:GROUP)")
    parser.add_argument(
        "--bind-host",
        help="interface to listen on for graph edges (default: this host's address toward the run; 0.0.0.0: all)",
    )
    parser.add_argument(
        "--advertise-host",
        help="address the other processes reach this worker at (default: the bind host; with 0.0.0.0, this host's "
        "address toward the run)",
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=300.0, metavar="S", help="seconds to wait for the run to answer"
    )


def run(args: argparse.Namespace) -> int:
    import trio

    from sagellm.runtime.executor.worker import serve_args

    trio.run(serve_args, args)
    return 0
