"""`sagellm bench pd-servers` end to end, small: two real `sagellm serve` on tiny weights, our gateway and
vllm-router's PD mode in front of them, the decode server alone; every path answers, the table and JSON come out.
No assert depends on this machine's speed."""

from __future__ import annotations

import json

from sagellm.cli.main import main
from tests.tiny_models import make_tiny_llama


def test_every_path_answers_and_the_table_is_written(tmp_path, capsys):
    model = make_tiny_llama(tmp_path / "tiny-llama")
    out = tmp_path / "pd_servers.json"
    assert (
        main(["bench", "pd-servers", "--model", str(model), "--words", "8,40", "--repeats", "1", "--out", str(out)])
        == 0
    )
    table = capsys.readouterr().out
    assert "CPU: " in table and "sagellm gateway PD TTFT ms" in table and "vllm-router PD TTFT ms" in table
    rows = json.loads(out.read_text())["rows"]
    assert [row["prompt_words"] for row in rows] == [8, 40]
    assert all(
        row[path] > 0 for row in rows for path in ("decode server alone", "sagellm gateway PD", "vllm-router PD")
    )
