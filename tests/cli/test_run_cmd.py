"""`sagellm run GRAPH` as a user runs it, on the repository's graph files and a tiny model: the PD graph (prefill and
decode in two worker processes) streams the same greedy reply as the colocated graph and as the offline API."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sagellm import LLM, SamplingParams
from tests.cli.test_cli import SAGELLM, run
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # `sagellm run` subprocesses, some with worker processes of their own

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
PROMPTS = ["What is the capital of France?", "Name three colors."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("run") / "tiny-llama")


def run_graph(graph: str, model: Path, out: Path, *extra: str) -> list[dict]:
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    result = run("run", str(GRAPHS / graph), "--model", str(model), *prompts, "--max-tokens", "12",
                 "--temperature", "0", "--output", str(out), *extra)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pipeline metrics" in result.stderr and "2 completed" in result.stderr
    assert "sagellm run: ready in" in result.stderr  # it says what start-up waits for, and when it is over
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert "".join(line["text"] + "\n" for line in lines) == result.stdout  # streamed replies, in order
    return lines


def test_pd_graph_in_two_processes_matches_colocated_and_the_offline_api(tiny, tmp_path):
    pd = run_graph("pd.yaml", tiny, tmp_path / "pd.jsonl")
    colocated = run_graph("colocated.yaml", tiny, tmp_path / "colocated.jsonl", "--policy", "priority")
    llm = LLM(str(tiny))
    params = SamplingParams(max_tokens=12, temperature=0)
    offline = [llm.chat([{"role": "user", "content": p}], params)[0].outputs[0].token_ids for p in PROMPTS]
    assert [line["token_ids"] for line in pd] == [line["token_ids"] for line in colocated] == offline


def test_bad_override_names_the_field(tiny):
    result = run("run", str(GRAPHS / "colocated.yaml"), "--model", str(tiny), "--set", "sort.policy=nonsense")
    assert result.returncode == 2
    assert "nonsense" in result.stderr and "fifo" in result.stderr


def test_ctrl_c_stops_the_run_and_its_worker_processes(tmp_path):
    long_context = make_tiny_llama(tmp_path / "long", max_position_embeddings=8192)
    command = [SAGELLM, "run", str(GRAPHS / "pd.yaml"), "--model", str(long_context), "--prompt", "hi"]
    process = subprocess.Popen([*command, "--max-tokens", "8000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(children(process.pid)) < 2 and time.monotonic() < deadline:  # both workers up
            time.sleep(0.2)
        workers = children(process.pid)
        assert len(workers) == 2, process.stderr.read1().decode() if process.poll() is not None else "no workers"
        time.sleep(2.0)  # generating now
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
        # Stopped by the run (told to end, or killed), they exit at once, though a loaded machine may take a moment;
        # 5 s is half the 10 s peer timeout after which workers the run left behind would stop by themselves.
        deadline = time.monotonic() + 5
        while (alive := [pid for pid in workers if Path(f"/proc/{pid}").exists()]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive
    finally:
        process.kill()


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def test_no_request_is_an_error_and_any_failed_request_fails_the_run(tiny, tmp_path):
    empty = run("run", str(GRAPHS / "colocated.yaml"), "--model", str(tiny), "--requests", str(_lines(tmp_path, [])))
    assert empty.returncode == 2 and "no request ran" in empty.stderr
    lines = [{"prompt": "Hello", "max_tokens": 3}, {"prompt_token_ids": [1, 999_999], "max_tokens": 3}]
    mixed = run("run", str(GRAPHS / "colocated.yaml"), "--model", str(tiny), "--requests", str(_lines(tmp_path, lines)))
    assert mixed.returncode == 1 and "1 of 2 requests failed (invalid_request ×1)" in mixed.stderr


def _lines(tmp_path: Path, requests: list[dict]) -> Path:
    path = tmp_path / f"requests-{len(requests)}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return path
