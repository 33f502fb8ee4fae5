"""A process of ours killed outright (kill -9) leaves nothing behind: the workers and API servers a gateway started,
and the parallel ranks an engine started, end within a second or so (`common.parent_death`), not after the peer
timeout's 10 s; the run's ipc socket folder goes with them, or, when no child was left to remove it, with the next
run that makes one (`zmq_trio.reclaim_ipc_dirs`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sagellm.common.processes import alive
from sagellm.runtime.comm.zmq_trio import IPC_DIR_ENV, reclaim_ipc_dirs
from tests.cli.test_cli import SAGELLM
from tests.cli.test_gateway_cli import free_port
from tests.tiny_models import make_tiny_llama

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
SMALL_ENGINES = ("--max-num-seqs", "2", "--kv-cache-memory-gb", "0.05", "--no-embedding")
GONE_WITHIN_S = 2.0


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A TMPDIR short enough for socket paths (pytest's are not), so the run's ipc folder is made here, alone."""
    path = Path(tempfile.mkdtemp(prefix="sl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def serve(args: list[str], home: Path, tmp: Path, cwd: Path | None = None, **env: str) -> tuple[subprocess.Popen, str]:
    """`sagellm serve ARGS` on a free port, and its URL once it is ready (every worker and API server up)."""
    port = free_port()
    environ = {**os.environ, "SAGELLM_HOME": str(home), "TMPDIR": str(tmp), "SAGELLM_LOG_LEVEL": "warning", **env}
    environ.pop(IPC_DIR_ENV, None)
    command = [SAGELLM, "serve", *args, "--port", str(port), *SMALL_ENGINES]
    gateway = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environ, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while gateway.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return gateway, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    gateway.kill()
    raise AssertionError(f"the gateway did not get ready: {gateway.communicate()[1].decode()[-3000:]}")


def descendants(pid: int) -> dict[int, str]:
    """Every process under `pid`, however deep, with its command line."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_bytes().rpartition(b")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child in [c for c, p in parents.items() if p == parent]:
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            frontier.append(child)
    return found


def seconds_until_gone(pids: list[int], limit_s: float = 20.0) -> float:
    """How long after now every one of `pids` has ended (a zombie counts as ended: nothing may reap it here)."""
    start = time.monotonic()
    while any(map(alive, pids)) and time.monotonic() - start < limit_s:
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.mark.slow
def test_a_gateway_killed_outright_takes_its_workers_api_servers_and_socket_folder_along(tmp_path, short_tmp):
    tiny = make_tiny_llama(tmp_path / "tiny")
    args = [str(GRAPHS / "pd.yaml"), "--model", str(tiny), "--api-servers", "1"]
    gateway, _ = serve(args, tmp_path / "home", short_tmp)
    try:
        children = descendants(gateway.pid)
        commands = sorted(c.split(" -m ", 1)[1].split()[0] for c in children.values() if " -m " in c)
        assert commands == ["sagellm.gateway.api_servers.server", *["sagellm.runtime.executor.worker"] * 2], children
        (ipc,) = short_tmp.glob(f"sagellm-{gateway.pid}-*")  # the run's socket folder, its owner's pid in its name
        gateway.kill()
        took = seconds_until_gone(list(children))
        gateway.wait()
        assert not [pid for pid in children if alive(pid)] and took < GONE_WITHIN_S, (took, children)
        assert not ipc.exists()  # its workers removed it as they ended
    finally:
        if gateway.poll() is None:
            gateway.kill()


@pytest.mark.slow
def test_an_engine_killed_outright_takes_its_parallel_ranks_along(tmp_path):
    tiny = make_tiny_llama(tmp_path / "tiny")
    script = (
        "from sagellm import LLM\n"
        f"llm = LLM(model={str(tiny)!r}, tensor_parallel_size=2, kv_cache_memory_gb=0.05, max_num_seqs=2)\n"
        "print('ready', flush=True)\n"
        "import time; time.sleep(120)\n"
    )
    env = {**os.environ, "SAGELLM_HOME": str(tmp_path / "home")}
    engine = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert engine.stdout is not None and engine.stdout.readline() == "ready\n"
        ranks = [pid for pid, c in descendants(engine.pid).items() if "sagellm.runtime.parallel.rank_worker" in c]
        assert len(ranks) == 1
        engine.kill()
        took = seconds_until_gone(ranks)
        assert not [pid for pid in ranks if alive(pid)] and took < GONE_WITHIN_S, took
    finally:
        engine.kill()
        engine.wait()


def test_the_next_run_removes_the_socket_folders_of_runs_that_are_gone(short_tmp):
    """A run with no child left to remove its folder (kill -9 of a run without workers) leaves it; the next process
    that makes one removes it, and those of live processes stay. A zombie (exited, not yet reaped) is gone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    zombie = subprocess.Popen(["true"])  # not waited for until the end: a zombie meanwhile
    while alive(zombie.pid):
        time.sleep(0.01)
    for owner in (dead.pid, zombie.pid, os.getpid()):
        (short_tmp / f"sagellm-{owner}-abc_12").mkdir()
    (short_tmp / "sagellm-ray-abc").mkdir()  # not a socket folder
    gone = sorted(str(short_tmp / f"sagellm-{pid}-abc_12") for pid in (dead.pid, zombie.pid))
    assert sorted(reclaim_ipc_dirs(str(short_tmp))) == gone
    zombie.wait()
    assert sorted(p.name for p in short_tmp.iterdir()) == [f"sagellm-{os.getpid()}-abc_12", "sagellm-ray-abc"]

    dead_run = short_tmp / f"sagellm-{dead.pid}-abc_12"
    dead_run.mkdir()
    env = {k: v for k, v in os.environ.items() if k != IPC_DIR_ENV} | {"TMPDIR": str(short_tmp)}
    made = "from sagellm.runtime.comm.zmq_trio import address; print(address('ipc', 'x'))"
    run = subprocess.run([sys.executable, "-c", made], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith(f"ipc://{short_tmp}/sagellm-"), run.stderr
    assert not dead_run.exists()
