"""How the user starts the workers of groups placed `remote:NAME` (`sagellm worker`, on any host): the run's key in a
file for them, the command that starts each, and what the run prints while it waits for them.

The process executor starts its other workers itself; these it can only ask for, so what it tells the user (stderr,
whatever the log level) must be exact enough to copy and run."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import structlog

from sagellm.common.home import keys_dir
from sagellm.runtime.comm.curve import RunKeys
from sagellm.runtime.pipeline.spec import is_loopback

log = structlog.get_logger("sagellm.process_executor")


def write_key_file(keys: RunKeys, graph_name: str, control_endpoint: str) -> Path:
    """The run's key, for the workers started by hand (`--key-file`): a file only its owner can read, named after
    the graph and the control port, under the sageLLM home."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", graph_name)
    key_file = keys_dir() / f"{name}-{control_endpoint.rpartition(':')[2]}.key"
    keys.write(key_file)
    return key_file


def worker_command(control_endpoint: str | None, group: str, key_file: Path | None) -> str:
    """The shell command that starts the worker of a remote group on its host."""
    key = f" --key-file {key_file}" if key_file is not None else ""
    return f"sagellm worker --connect {control_endpoint} --group {group}{key}"


def announce_remote_workers(
    groups: list[str], command: Callable[[str], str], key_file: Path | None, advertise_host: str
) -> None:
    """The user starts remote workers: say exactly how (stderr, whatever the log level)."""
    for group in groups:
        line = command(group)
        log.info("waiting_for_remote_worker", group=group, command=line)
        print(f"sagellm: waiting for group {group!r}; on its host run: {line}", file=sys.stderr, flush=True)
    if groups and key_file is not None:
        print(
            f"sagellm: the run is encrypted: first copy its key {key_file} to that host over a secure channel "
            "(scp -p, keeping it readable by its owner only) and give its path there to --key-file",
            file=sys.stderr,
            flush=True,
        )
    if groups and is_loopback(advertise_host):
        print("sagellm: (only this host can connect: set bind_host: 0.0.0.0 to accept others)", file=sys.stderr)
