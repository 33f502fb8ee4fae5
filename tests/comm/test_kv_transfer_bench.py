"""Smoke test of `sagellm bench kv-transfer` (W7) on a tiny KV: every path, including the spawned prefill processes
over ipc://, tcp:// and shared memory, moves the payload (the benchmark checks the bytes) and the command writes its
JSON and PNG. Nothing here is timed; real numbers come from the command itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sagellm.benchmarks.kv_transfer import KVShape, kv_shape
from sagellm.cli.main import main
from tests.tiny_models import make_tiny_llama


def test_kv_shape_comes_from_the_model_config(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny-llama")
    config = json.loads((model / "config.json").read_text())
    shape = kv_shape(model, 16)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert shape.dims == (config["num_hidden_layers"], 2, 16, config["num_key_value_heads"], head_dim)
    assert kv_shape(None, 1024) == KVShape() and KVShape().dims == (30, 2, 1024, 3, 64)  # SmolLM2-135M


@pytest.mark.slow
def test_bench_kv_transfer_writes_json_and_png(tmp_path: Path) -> None:
    argv = ["bench", "kv-transfer", "--tokens", "8", "--repeats", "3", "--warmup", "1", "--out", str(tmp_path)]

    assert main(argv) == 0

    results = json.loads((tmp_path / "kv_transfer.json").read_text())
    assert results["shape"] == [30, 2, 8, 3, 64] and results["bytes"] == 30 * 2 * 8 * 3 * 64 * 4
    rows = {r["path"]: r for r in results["results"]}
    assert list(rows) == ["memcpy", "in-process", "ipc", "tcp", "shm", "shm-zero-copy"]
    for row in rows.values():
        assert row["gbps_median"] > 0 and row["ms_median"] > 0 and len(row["runs_ms"]) == 3
    assert rows["memcpy"]["vs_memcpy"] == 1.0
    assert (tmp_path / "kv_transfer.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_bench_kv_transfer_rejects_an_unknown_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "kv-transfer", "--paths", "memcpy,rdma", "--out", str(tmp_path)]) == 2
    assert "rdma" in capsys.readouterr().err
