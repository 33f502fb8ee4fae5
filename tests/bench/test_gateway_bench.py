"""`sagellm bench gateway` end to end, small: the fake engine (on aiohttp, and on our own HTTP server), vllm-router in
front of it and our gateway in front of the instant engine (alone, and behind 2 API servers), each a real server
process on 127.0.0.1, loaded with streamed chat requests; every request ends with its 16 text events, and the table,
JSON and PNG come out. No assert depends on this machine's speed."""

from __future__ import annotations

import json

from sagellm.cli.main import main


def test_every_path_streams_every_request_and_the_report_is_written(tmp_path, capsys):
    out = tmp_path / "gateway.json"
    args = ["bench", "gateway", "--requests", "12", "--warmup", "4", "--concurrency", "1,4", "--rounds", "2"]
    assert main([*args, "--save-result", "--result-filename", str(out)]) == 0
    table = capsys.readouterr().out
    paths = ("engine", "engine on our HTTP server", "vllm-router", "sagellm", "sagellm ×2 API servers")
    for path in paths:
        assert f"| {path} | 1 | 24 / 0 |" in table and f"| {path} | 4 | 24 / 0 |" in table
    results = json.loads(out.read_text())["results"]
    assert {(r["path"], r["concurrency"]) for r in results} == {(p, c) for p in paths for c in (1, 4)}
    fronts = [r for r in results if r["path"] != "engine"]  # (CPU is read in 10 ms ticks: a few requests may show 0)
    assert all(r["server_cpu_ms_per_request"] is not None and r["added_p50_ms"] is not None for r in fronts)
    assert out.with_suffix(".png").stat().st_size > 0
