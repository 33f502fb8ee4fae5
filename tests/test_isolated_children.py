"""Every process sageLLM starts imports the installed sageLLM, not a `sagellm/` folder where the user stands: each
kind is started from a working directory holding one whose `__init__` leaves a mark and exits 77, and none ran it.
The kinds: a pipeline worker (a graph's engine placed `process`), an API server (`--api-servers`), a managed engine
(the management API) and its parallel rank (`tensor_parallel: 2`). `tests/common/test_processes.py` holds the code
to the one command builder (`common.processes.python_module`, `python -P`); this holds the processes to it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.executor.test_clean_deaths import GRAPHS, descendants, serve
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # a gateway and four processes under it

KINDS = {
    "sagellm.runtime.executor.worker": 2,  # the graph's engine, the managed engine
    "sagellm.gateway.api_servers.server": 1,
    "sagellm.runtime.parallel.rank_worker": 1,  # the managed engine's second rank
}


def test_no_child_of_any_kind_imports_a_sagellm_folder_in_the_working_directory(tmp_path):
    tiny = make_tiny_llama(tmp_path / "tiny")
    mark = tmp_path / "impostor-ran"
    here = tmp_path / "where-the-user-stands"
    (here / "sagellm").mkdir(parents=True)
    (here / "sagellm" / "__init__.py").write_text(f"open({str(mark)!r}, 'a').write('ran')\nraise SystemExit(77)\n")

    graph = tmp_path / "worker.yaml"  # the colocated graph, its engine in a worker process
    colocated = (GRAPHS / "colocated.yaml").read_text()
    graph.write_text(colocated.replace("{op: engine}", "{op: engine, placement: process}"))
    args = [str(graph), "--model", str(tiny), "--api-servers", "1"]
    gateway, url = serve(args, tmp_path / "home", Path("/tmp"), cwd=here, SAGELLM_ADMIN_KEY="admin")
    try:
        with httpx.Client(base_url=url, headers={"authorization": "Bearer admin"}, timeout=60) as admin:
            body = {"model": str(tiny), "served_model_name": str(tiny), "tensor_parallel": 2,
                    "engine": {"max_num_seqs": 2, "kv_cache_memory_gb": 0.05}}  # fmt: skip
            started = admin.post("/v1/management/engines", json=body)
            assert started.status_code == 201, started.text
            engine = started.json()
            deadline = time.monotonic() + 120
            while engine["state"] not in ("ready", "failed") and time.monotonic() < deadline:
                time.sleep(0.3)
                engine = admin.get(f"/v1/management/engines/{engine['id']}").json()
            assert engine["state"] == "ready", engine
            reply = admin.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})  # through the API server
            assert reply.status_code == 200, reply.text
        children = descendants(gateway.pid).values()
        started_kinds = {kind: sum(f" -P -m {kind} " in f"{c} " for c in children) for kind in KINDS}
        assert started_kinds == KINDS, list(children)
        assert not mark.exists()
    finally:
        gateway.terminate()
        gateway.wait(60)
