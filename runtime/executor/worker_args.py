"""A worker's command-line options, in a module of their own that imports nothing heavy: `sagellm worker` lists them
in its help, and the parent spawns its own workers with them."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's options: `sagellm worker` takes them, and the parent spawns its own workers with them."""
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
        "--key-file",
        metavar="PATH",
        help="the run's key, when its links are encrypted (the run prints the file to copy here; mode 0600). "
        "Default: $SAGELLM_RUN_KEY if set",
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=300.0, metavar="S", help="seconds to wait for the run to answer"
    )
