"""A model that will not load (a truncated GGUF) is the user's to fix, and is said once, in the loader's words:
`sagellm serve` prints one error line, no traceback, and exits 2, whether the gateway reads the model itself or a
worker process loads it (the worker tells its parent why, and the parent raises it as what it is); a managed engine
that cannot start carries the same line in the management API's `last_error`."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.cli.test_cli import SAGELLM
from tests.cli.test_gateway_cli import free_port
from tests.executor.test_clean_deaths import GRAPHS, serve
from tests.tiny_models import make_tiny_llama, write_tiny_gguf

pytestmark = pytest.mark.slow  # gateways and workers
LOADER = "corrupt or truncated GGUF file"  # the loader's words (runtime/models/gguf_loader.py)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model, and the first 4 KB of its GGUF (its metadata cut short)."""
    folder = tmp_path_factory.mktemp("bad-model")
    tiny = make_tiny_llama(folder / "tiny")
    whole = write_tiny_gguf(folder / "tiny.gguf", tiny).read_bytes()
    truncated = folder / "truncated.gguf"
    truncated.write_bytes(whole[:4096])
    return tiny, truncated


def failed_serve(home: Path, *args: str) -> subprocess.CompletedProcess:
    command = [SAGELLM, "serve", *args, "--port", str(free_port()), "--no-embedding", "--kv-cache-memory-gb", "0.05"]
    env = {**os.environ, "SAGELLM_HOME": str(home), "SAGELLM_LOG_LEVEL": "warning"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def assert_said_once(ran: subprocess.CompletedProcess, model: Path) -> None:
    errors = [line for line in ran.stderr.splitlines() if line.startswith("sagellm serve: error:")]
    assert ran.returncode == 2, ran.stderr
    assert len(errors) == 1 and f"{model}: {LOADER}" in errors[0], ran.stderr
    assert "Traceback" not in ran.stderr and "+--" not in ran.stderr, ran.stderr


def test_serve_says_a_truncated_model_in_one_line_and_exits_2(models, tmp_path):
    _, truncated = models
    assert_said_once(failed_serve(tmp_path, str(truncated)), truncated)


def test_a_worker_that_cannot_load_its_model_is_said_in_one_line_too(models, tmp_path):
    """The gateway reads the graph's (good) model; the prefill worker's own model is the truncated one."""
    tiny, truncated = models
    ran = failed_serve(tmp_path, str(GRAPHS / "pd.yaml"), "--model", str(tiny), "--set", f"prefill.model={truncated}")
    assert_said_once(ran, truncated)
    assert "worker process 'prefill' failed before it was ready" in ran.stderr


def test_a_managed_engine_that_cannot_start_carries_the_loader_s_line(models, tmp_path):
    """Both ways an engine of ours reads its model: a replica of the gateway's model (its worker loads it), another
    model (the gateway reads its files first)."""
    tiny, truncated = models
    gateway, url = serve([str(tiny)], tmp_path / "home", Path(tempfile.gettempdir()), SAGELLM_ADMIN_KEY="admin")
    try:
        with httpx.Client(base_url=url, headers={"authorization": "Bearer admin"}, timeout=60) as admin:
            for body in ({"model": str(truncated), "served_model_name": str(tiny)}, {"model": str(truncated)}):
                started = admin.post("/v1/management/engines", json=body)
                assert started.status_code == 201, started.text
                engine = started.json()
                deadline = time.monotonic() + 60
                while engine["state"] != "failed" and time.monotonic() < deadline:
                    time.sleep(0.2)
                    engine = admin.get(f"/v1/management/engines/{engine['id']}").json()
                error = engine["last_error"]
                assert engine["state"] == "failed" and f"{truncated}: {LOADER}" in error and "\n" not in error, engine
    finally:
        gateway.terminate()
        gateway.wait(60)
