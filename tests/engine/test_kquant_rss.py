"""A ~1B Q4_K_M file served from its blocks costs about its size in memory: `sagellm serve` on the 1b preset of
`sagellm bench make-gguf` (16 layers of hidden 2048, ~0.62 GiB) as a real server process, after a completion, holds
at most 1.5x the file plus the KV cache it was given beyond what the same server holds for a model of almost nothing
(two layers of hidden 256, the same vocabulary): VmRSS summed over it and any child process.

The server's own memory (Python, torch, the gateway: ~0.3 GiB) is measured rather than counted against the model,
since it is the same for any model. The bound is what keeping the weights as blocks is for: a float copy of any
sizeable part of them (~7x their bytes in fp32), or the blocks held twice, breaks it. The failure message carries
the servers' own memory lines (weights, KV, other) and smaps_rollup, which say where the rest went."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from sagellm.benchmarks.synthetic_gguf import PRESETS, write_llama_q4_k_m
from sagellm.common.memory import resident_bytes
from sagellm.runtime.models.tokenizer import TOKENIZER_FILES
from tests.cli.test_cli import SAGELLM
from tests.cli.test_gateway_cli import free_port
from tests.executor.test_clean_deaths import descendants

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.timeout(900)]  # network: SmolLM2 tokenizer

GIB = 2**30
KV_GIB = 0.25  # --kv-cache-memory-gb: small and explicit, so the bound does not depend on the machine's free memory
RSS_PER_FILE_BYTE = 1.5
READY_TIMEOUT_S = 300
ALMOST_NOTHING = dict(hidden=256, layers=2, intermediate=512, heads=4, kv_heads=2, tied=True)


@pytest.fixture(scope="module")
def one_b(tmp_path_factory, smollm2_dir) -> Path:
    """The 1b preset (~40 s on 2 cores), written once."""
    path = tmp_path_factory.mktemp("rss") / "llama-1b.Q4_K_M.gguf"
    write_llama_q4_k_m(path, **vars(PRESETS["1b"]), tokenizer_from=smollm2_dir)
    return _beside_its_tokenizer(path, smollm2_dir)


def _beside_its_tokenizer(gguf: Path, smollm2_dir: Path) -> Path:
    """SmolLM2's saved tokenizer files beside `gguf` (whose tokenizer is SmolLM2's), as the model cache leaves a
    downloaded GGUF: the server loads them in well under a second instead of building the tokenizer from the file's
    metadata, which takes seconds and is done twice in a server (its admission and its engine)."""
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_dir / name, gguf.parent / name)
    return gguf


def test_a_served_1b_q4_k_m_file_holds_at_most_one_and_a_half_times_its_size_plus_the_kv(one_b, tmp_path, smollm2_dir):
    tiny = write_llama_q4_k_m(tmp_path / "tiny.gguf", **ALMOST_NOTHING, tokenizer_from=smollm2_dir, progress=False)
    _beside_its_tokenizer(tiny, smollm2_dir)
    rss, said, rollup = _served_rss(one_b, tmp_path / "1b")
    base, base_said, _ = _served_rss(tiny, tmp_path / "tiny")
    size = one_b.stat().st_size - tiny.stat().st_size
    bound = base + RSS_PER_FILE_BYTE * size + KV_GIB * GIB
    print(f"file {size / GIB:.3f} GiB more, RSS {rss / GIB:.3f} GiB (an almost empty model's {base / GIB:.3f}), "
          f"bound {bound / GIB:.3f} GiB; server: {said}; almost empty: {base_said}")  # fmt: skip
    assert rss <= bound, (
        f"RSS {rss / GIB:.3f} GiB > {base / GIB:.3f} GiB of an almost empty model + {RSS_PER_FILE_BYTE} x the file's "
        f"{size / GIB:.3f} GiB more + KV {KV_GIB} GiB = {bound / GIB:.3f} GiB; the server said: {said}\n{rollup}"
    )


def _served_rss(model: Path, home: Path) -> tuple[int, str, str]:
    """(VmRSS, its own memory line, smaps_rollup) of `sagellm serve model` after one completion."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [SAGELLM, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--no-embedding",
               "--kv-cache-memory-gb", str(KV_GIB)]  # fmt: skip
    home.mkdir(parents=True, exist_ok=True)
    log = home / "serve.log"
    env = {**os.environ, "SAGELLM_HOME": str(home / "home")}
    with log.open("wb") as stderr:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        _wait_ready(server, url, log)
        reply = httpx.post(url + "/v1/completions", json={"prompt": "Hello, my name is", "max_tokens": 8}, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 8
        rss = _settled_rss(server.pid)
        rollup = Path(f"/proc/{server.pid}/smaps_rollup").read_text()
    finally:
        server.terminate()
        server.wait(60)
    return rss, _memory_line(log), rollup


def _wait_ready(server: subprocess.Popen, url: str, log: Path) -> None:
    """Polls /ready with one client: `httpx.get` builds a TLS context per call, ~60 ms of CPU taken from the server
    starting beside it."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            assert server.poll() is None, f"sagellm serve exited {server.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if client.get(url + "/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise AssertionError(f"not ready in {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _settled_rss(pid: int, timeout: float = 60.0) -> int:
    """VmRSS summed over `pid` and its descendants, once two readings a second apart differ by under 1%."""
    last, deadline = -1, time.monotonic() + timeout
    while True:
        now = sum(resident_bytes(pid=p) or 0 for p in [pid, *descendants(pid)])
        if abs(now - last) < 0.01 * now or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(1.0)


def _memory_line(log: Path) -> str:
    """The server's own account of its memory (the gateway_ready event's), or '?'."""
    for row in reversed(log.read_text(errors="replace").splitlines()):
        if '"gateway_ready"' in row:
            try:
                return json.loads(row).get("memory", "?")
            except json.JSONDecodeError:
                return "?"
    return "?"
