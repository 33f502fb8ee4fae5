"""How `sagellm gateway`, `engine` and `preset` reach a gateway: its files in the state directory (pid, URL, log,
admin key) and its management API.

`sagellm gateway start` writes `gateway.pid` and `gateway.json` (URL, start time, log file) next to the admin key the
gateway writes; the other commands find the gateway there, or take `--url` and `--admin-key` for one elsewhere."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from sagellm.common.errors import Unavailable, for_status
from sagellm.common.home import gateway_dir
from sagellm.gateway.state import PID_FILE, read_record

ENGINES_PATH = "/v1/management/engines"
MODELS_PATH = "/v1/management/models"


class GatewayError(Unavailable):
    """No gateway is running where the command looked, or it cannot be reached."""


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the gateway's URL (default: the one `sagellm gateway start` recorded)")
    p.add_argument("--admin-key", help="the admin key (default: env SAGELLM_ADMIN_KEY, then STATE_DIR/admin.key)")
    add_state_dir_argument(p)


def add_state_dir_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, help="the gateway's state directory (default $SAGELLM_HOME/gateway)")


def state_dir_of(args: argparse.Namespace) -> Path:
    return args.state_dir or gateway_dir()


def running_pid(state_dir: Path) -> int | None:
    """The pid in `gateway.pid` if that process is alive and is a `sagellm serve` (not a reused pid)."""
    try:
        pid = int((state_dir / PID_FILE).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return None
    return pid if state != "Z" and b"serve" in cmdline else None


class ManagementClient:
    """The gateway's management API: GatewayError when it cannot be reached; a refused call raises the kind its
    status stands for (`for_status`: a 404 is NotFound), with the gateway's message."""

    def __init__(self, url: str, admin_key: str | None) -> None:
        self.url = url.rstrip("/")
        import httpx  # here: `sagellm --help` must not pay for it

        headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(10.0, read=120.0))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ManagementClient:
        from sagellm.gateway.config import ADMIN_KEY_ENV
        from sagellm.gateway.http.auth import read_admin_key

        state_dir = state_dir_of(args)
        url = args.url
        if url is None:
            record = read_record(state_dir)
            if record is None or running_pid(state_dir) is None:
                hint = "start one (sagellm gateway start) or give --url"
                raise GatewayError(f"no gateway is running from {state_dir}; {hint}")
            url = record.url
        key = args.admin_key or os.environ.get(ADMIN_KEY_ENV) or read_admin_key(state_dir)
        return cls(url, key)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, **params: Any) -> Any:
        import httpx

        try:
            reply = self.http.request(method, path, json=body, params=params or None)
        except httpx.HTTPError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.url}: {exc}") from None
        if reply.is_success:
            return reply.json()
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text.strip() or reply.reason_phrase
        raise for_status(reply.status_code)(f"{method} {path}: {reply.status_code} {message}")

    def engines(self) -> list[dict[str, Any]]:
        return self.call("GET", ENGINES_PATH)["data"]

    def models(self) -> list[dict[str, Any]]:
        """The models loaded on demand (none for a gateway of one graph)."""
        return self.call("GET", MODELS_PATH)["data"]

    def start_engine(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", ENGINES_PATH, {k: v for k, v in body.items() if v is not None})

    def stop_engine(self, engine_id: str, force: bool = False) -> dict[str, Any]:
        return self.call("DELETE", f"{ENGINES_PATH}/{engine_id}", force=str(force).lower())

    def wait_ready(self, engine_ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
        """Polls until every engine is ready or failed (or the timeout); returns each one's last record."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, dict[str, Any]] = {}
        while True:
            last = {e["id"]: e for e in self.engines() if e["id"] in engine_ids}
            settled = all(last.get(i, {}).get("state") in ("ready", "failed", None) for i in engine_ids)
            if settled or time.monotonic() > deadline:
                return last
            time.sleep(0.5)


def engines_table(engines: list[dict[str, Any]], title: str = "engines") -> Any:
    from rich.table import Table

    colors = {"ready": "green", "starting": "yellow", "draining": "yellow", "unhealthy": "red", "failed": "red"}
    table = Table(title=title)
    for column in ("id", "kind", "model", "label", "state", "url", "pid", "in flight", "restarts"):
        table.add_column(column, overflow="fold")  # model paths and URLs wrap instead of being cut
    for e in engines:
        state = e["state"]
        table.add_row(
            e["id"],
            e["kind"],
            str(e["model"]),
            e.get("label") or "",
            f"[{colors.get(state, 'white')}]{state}[/]",
            e.get("url") or "(in the gateway)",
            str(e.get("pid") or ""),
            str(e.get("in_flight", "")),
            str(e.get("restarts", 0)),
        )
    return table


def models_table(models: list[dict[str, Any]]) -> Any:
    """The models loaded on demand: status, memory (the engine's resident set), requests and idle time."""
    from rich.table import Table

    colors = {"loaded": "green", "loading": "yellow", "unloaded": "white", "failed": "red"}
    table = Table(title="models on demand")
    for column in ("model", "status", "engine", "memory", "in flight", "idle", "source"):
        table.add_column(column, overflow="fold")
    for m in models:
        value = m["status"]["value"] + (" (draining)" if m["status"].get("draining") else "")
        memory = f"{m['memory_bytes'] / 2**30:.2f} GiB" if m.get("memory_bytes") else ""
        idle = f"{m['idle_s']:.0f} s" if m.get("idle_s") is not None else ""
        table.add_row(m["id"], f"[{colors.get(m['status']['value'], 'white')}]{value}[/]", m.get("engine") or "",
                      memory, str(m.get("in_flight", "")), idle, m.get("source") or "")  # fmt: skip
    return table


def failures(engines: list[dict[str, Any]]) -> list[str]:
    """`ID: last error` for each engine that did not become ready."""
    not_ready = [e for e in engines if e["state"] != "ready"]
    return [f"{e['id']}: {e['state']}: {e.get('last_error') or 'no error recorded'}" for e in not_ready]
