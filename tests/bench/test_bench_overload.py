"""`sagellm bench overload` end to end, small: every scenario against a real `sagellm serve` on a tiny random Llama
for a few seconds each, the vLLM peer skipped; the table, JSON and PNG come out with every measure. No assert depends
on this machine's speed."""

from __future__ import annotations

import json

from sagellm.cli.main import main
from tests.tiny_models import make_tiny_llama

MEASURES = {  # scenario -> the keys of what it measured
    "abandoned": {"abandoned_tokens", "generated", "idle_s", "abandoned_with_a_token", "long_tokens_received"},
    "late-refusals": {"status", "status_p50_ms", "status_p99_ms", "first_token", "retry_after_s"},
    "refused-batch": {"batches"},
    "metastable": {"capacity_tok_s", "goodput_pct", "wasted_pct", "refusals", "refusal_p99_ms", "timeline_tok_s"},
}


def test_every_scenario_runs_against_our_server_and_the_report_is_written(tmp_path, capsys):
    model = make_tiny_llama(tmp_path / "tiny-llama", max_position_embeddings=1024)
    out = tmp_path / "overload.json"
    argv = ["bench", "overload", "--peers", "none", "--model", str(model), "--out", str(out)]
    argv += ["--long-tokens", "900", "--abandoned-tokens", "64", "--extra", "4", "--refusal-timeout-s", "2"]
    argv += ["--batch-prompts", "50,9", "--batch-timeout-s", "5", "--batch-seqs", "4", "--batch-queue", "8"]
    argv += ["--capacity-s", "2", "--overload-s", "3", "--client-timeout-s", "2", "--idle-timeout-s", "20"]
    assert main(argv) == 0

    printed = capsys.readouterr().out
    assert "| scenario | measure | sageLLM |" in printed and "\nCPU: " in printed
    for measure in ("tokens generated for the 4 that left", "status line p50 / p99", "goodput at 4×"):
        assert measure in printed
    results = json.loads(out.read_text())
    measured = results["results"]["sagellm"]
    assert set(measured) == set(MEASURES)
    for scenario, keys in MEASURES.items():
        assert keys <= set(measured[scenario]), scenario
    batches = measured["refused-batch"]["batches"]
    assert [(b["prompts"], b["status"], b["prompts_ran"]) for b in batches[:1]] == [(50, 400, 0)]  # over the bound
    assert measured["metastable"]["capacity_tok_s"] > 0 and measured["metastable"]["clients"] > 0
    assert results["setups"]["sagellm"]["small"] == "--set engine.max_num_seqs=2 --set admission.max_queue=8"
    assert "--peers none" in results["command"] and results["cpu"]
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
