"""`sagellm gateway start|stop|status|logs`: the gateway as a background process.

    sagellm gateway start --port 8000 --no-embedding     # `sagellm serve` detached; waits until /health answers
    sagellm gateway status                              # address, pid, uptime, health, engines, models on demand
    sagellm gateway logs --follow
    sagellm gateway stop                                # SIGTERM (graceful), SIGKILL after --timeout

`start` takes every option of `sagellm serve`. The process runs in its own session with its output in
STATE_DIR/gateway.log, its pid in STATE_DIR/gateway.pid and its URL in STATE_DIR/gateway.json (STATE_DIR:
--state-dir, default $SAGELLM_HOME/gateway), where `status`, `stop`, `sagellm engine` and `sagellm preset` find it,
with the admin key the gateway writes there (a key given with --admin-key is not written: give it to those commands
too, or set SAGELLM_ADMIN_KEY). Keys reach the process through its environment, not its command line."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sagellm.cli.gateway_client import (
    ManagementClient,
    add_state_dir_argument,
    engines_table,
    models_table,
    running_pid,
    state_dir_of,
)
from sagellm.common.errors import NotFound, SageLLMError, users_file
from sagellm.common.processes import python_module
from sagellm.gateway.state import LOG_FILE, GatewayRecord, read_record, remove_record, write_record

if TYPE_CHECKING:
    import httpx

# Options of `start` not passed on as arguments: its own, and the keys, which go in the environment (a command
# line is visible to every user of the machine in `ps`).
_NOT_ARGUMENTS = ("help", "wait_timeout", "api_key", "admin_key")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from sagellm.cli.serve_flags import add_serve_arguments

    p = sub.add_parser("gateway", help="run the gateway in the background: start, stop, status, logs",
                       description=__doc__.split("\n\n")[0])  # fmt: skip
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = actions.add_parser("start", help="start `sagellm serve` in the background and wait until it is healthy",
                               description="Takes every option of `sagellm serve`.")  # fmt: skip
    add_serve_arguments(start)
    start.add_argument("--wait-timeout", type=float, default=900.0, help="seconds to wait for /health (default 900)")
    start.set_defaults(run=run_start, serve_parser=start)
    stop = actions.add_parser("stop", help="stop the background gateway (SIGTERM, then SIGKILL after --timeout)")
    add_state_dir_argument(stop)
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a graceful stop (default 60)")
    stop.set_defaults(run=run_stop)
    status = actions.add_parser("status", help="address, pid, uptime, health and engines (exit 1: not running)")
    add_state_dir_argument(status)
    status.add_argument("--admin-key", help="admin key (default: env SAGELLM_ADMIN_KEY, then STATE_DIR/admin.key)")
    status.set_defaults(run=run_status, url=None)
    logs = actions.add_parser("logs", help="print the gateway's log")
    add_state_dir_argument(logs)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until Ctrl-C")
    logs.add_argument("--lines", "-n", type=int, help="only the last N lines")
    logs.set_defaults(run=run_logs)


# -- start --------------------------------------------------------------------------------------------------------
def run_start(args: argparse.Namespace) -> int:
    import httpx
    from rich.console import Console

    from sagellm.gateway.config import ADMIN_KEY_ENV, API_KEY_ENV
    from sagellm.gateway.http.port import check_port_free
    from sagellm.gateway.state import free_port, log_tail

    console = Console(stderr=True)
    state_dir = state_dir_of(args).resolve()
    with users_file(state_dir, "make the state directory"):
        state_dir.mkdir(parents=True, exist_ok=True)
    running = running_pid(state_dir)
    if running is not None:
        record = read_record(state_dir)
        console.print(f"a gateway is already running (pid {running}, {record.url if record else '?'}); "
                      "stop it first: sagellm gateway stop")  # fmt: skip
        return 1
    args.state_dir = state_dir
    args.port = args.port or free_port()
    check_port_free(args.host, args.port)
    url = f"http://{_client_host(args.host)}:{args.port}"
    env = dict(os.environ)
    if args.api_key:
        env[API_KEY_ENV] = ",".join(args.api_key)
    if args.admin_key:
        env[ADMIN_KEY_ENV] = args.admin_key
    log_path = state_dir / LOG_FILE
    command = python_module("sagellm.cli.main", "serve", *_serve_argv(args.serve_parser, args))
    with log_path.open("ab") as log:
        log.write(f"\n== sagellm gateway start {time.strftime('%Y-%m-%d %H:%M:%S')}: {url}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # fmt: skip
    write_record(state_dir, GatewayRecord(url, process.pid, time.time(), str(log_path)))
    deadline = time.monotonic() + args.wait_timeout
    # One client for every poll: `httpx.get` builds a TLS context per call (~60 ms of CPU), which polled every 0.3 s
    # took a sixth of a core from the gateway starting beside it.
    poller = httpx.Client(timeout=2.0)
    with console.status(f"starting the gateway at {url} (pid {process.pid}, log {log_path})"), poller:
        while not _healthy(poller, url):
            if process.poll() is not None:
                remove_record(state_dir)
                console.print(f"[red]the gateway exited with code {process.returncode}[/]; its log ends with:")
                console.print(log_tail(log_path, 15), markup=False, highlight=False)
                return 1
            if time.monotonic() > deadline:
                console.print(f"[red]not healthy after {args.wait_timeout:g} s[/]; it keeps starting in the "
                              f"background (sagellm gateway logs / stop); log: {log_path}")  # fmt: skip
                return 1
            time.sleep(0.3)
    console.print(f"[green]gateway ready[/] at {url} (pid {process.pid}); admin key in {state_dir / 'admin.key'}")
    return 0


def _serve_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """`args` back as `sagellm serve` arguments: every option given (or set by start) that differs from its
    default, so the background gateway gets exactly what `start` was told."""
    argv: list[str] = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest in _NOT_ARGUMENTS or value is None or value == action.default:
            continue
        flag = action.option_strings[-1] if action.option_strings else None
        if flag is None:
            argv.append(str(value))
        elif isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x
            argv.append(action.option_strings[0 if value else 1])
        elif action.nargs == 0:  # store_true
            argv.append(flag)
        elif isinstance(value, list):  # append
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def _client_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, host)


def _healthy(client: httpx.Client, url: str) -> bool:
    import httpx

    try:
        return client.get(f"{url}/health").status_code == 200
    except httpx.HTTPError:
        return False


# -- stop ---------------------------------------------------------------------------------------------------------
def run_stop(args: argparse.Namespace) -> int:
    state_dir = state_dir_of(args)
    pid = running_pid(state_dir)
    if pid is None:
        remove_record(state_dir)
        print(f"no gateway is running from {state_dir}", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while running_pid(state_dir) == pid and time.monotonic() < deadline:
        time.sleep(0.2)
    how = "stopped"
    if running_pid(state_dir) == pid:
        os.kill(pid, signal.SIGKILL)
        how = f"killed (not stopped after {args.timeout:g} s)"
        while running_pid(state_dir) == pid:
            time.sleep(0.1)
    remove_record(state_dir)
    print(f"gateway {how} (pid {pid})", file=sys.stderr)
    return 0


# -- status -------------------------------------------------------------------------------------------------------
def run_status(args: argparse.Namespace) -> int:
    import httpx
    from rich.console import Console
    from rich.table import Table

    console = Console()
    state_dir = state_dir_of(args)
    pid, record = running_pid(state_dir), read_record(state_dir)
    if pid is None or record is None:
        console.print(f"no gateway is running from {state_dir} (start one: sagellm gateway start)")
        return 1
    try:
        reply = httpx.get(f"{record.url}/health", timeout=5.0)
        health, body = ("ok" if reply.status_code == 200 else "unhealthy"), reply.json()
    except (httpx.HTTPError, ValueError) as exc:
        health, body = f"unreachable ({exc})", {}
    table = Table(show_header=False, title="gateway")
    table.add_row("address", record.url)
    table.add_row("pid", str(pid))
    table.add_row("uptime", _duration(time.time() - record.started_at))
    table.add_row("health", f"[{'green' if health == 'ok' else 'red'}]{health}[/]")
    table.add_row("model", str(body.get("model", "?")))
    table.add_row("in flight", str(body.get("in_flight", "?")))
    table.add_row("log", record.log)
    console.print(table)
    try:
        client = ManagementClient.from_args(args)
        console.print(engines_table(client.engines()))
        models = client.models()
        if models:
            console.print(models_table(models))
    except SageLLMError as error:  # unreachable, or a refused call (another admin key): the status is still shown
        console.print(f"[yellow]engines: {error}[/]")
    return 0 if health == "ok" else 1


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m {s:02d}s" if hours else f"{m}m {s:02d}s"


# -- logs ---------------------------------------------------------------------------------------------------------
def run_logs(args: argparse.Namespace) -> int:
    path = Path(state_dir_of(args)) / LOG_FILE
    if not path.exists():
        raise NotFound(f"{path}: no gateway log yet (sagellm gateway start writes it)")
    with path.open("rb") as log:
        text = log.read().decode("utf-8", "replace")
        if args.lines is not None:
            text = "".join(text.splitlines(keepends=True)[-args.lines :])
        sys.stdout.write(text)
        sys.stdout.flush()
        try:
            while args.follow:
                chunk = log.read()
                if chunk:
                    sys.stdout.write(chunk.decode("utf-8", "replace"))
                    sys.stdout.flush()
                else:
                    time.sleep(0.3)
        except KeyboardInterrupt:  # the way to end --follow
            pass
    return 0
