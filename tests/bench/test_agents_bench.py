"""`sagellm bench agents` end to end, small: a few short sessions through `sagellm serve` on a tiny random Llama,
without and with the KV tiers, the server restarted mid-run; a peer skipped with a note. The table, JSON and PNG come
out with every phase; no assert depends on this machine's speed."""

from __future__ import annotations

import json

from sagellm.benchmarks.agents_load import Conversations, Workload
from sagellm.cli.main import main
from tests.tiny_models import make_tiny_llama, make_tokenizer

SMALL = Workload(sessions=3, turns=3, prefix_tokens=160, tool_tokens=24, max_tokens=8, restart_after=2)


def test_sessions_are_their_own_from_the_first_line_and_as_long_as_asked():
    tokenizer = make_tokenizer()
    made = Conversations(tokenizer, SMALL)
    again = Conversations(tokenizer, SMALL)
    assert made.prefixes == again.prefixes and made.tools == again.tools  # the seed decides every text
    firsts = {prefix.splitlines()[0] for prefix in made.prefixes}
    assert len(firsts) == SMALL.sessions  # no block of one session's prefix is another's
    for prefix in made.prefixes:
        assert SMALL.prefix_tokens <= len(tokenizer(prefix)["input_ids"]) <= SMALL.prefix_tokens + 40
    session = made.sessions()[0]
    made.next_turn(session, "a reply", 2)
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user"]
    assert session.messages[-1]["content"] == made.tools[0][1]
    assert [SMALL.phase(t) for t in (1, 2, 3)] == ["first", "returning", "after restart"]


def test_both_of_our_arms_run_across_a_restart_and_the_report_is_written(tmp_path, capsys):
    model = make_tiny_llama(tmp_path / "tiny-llama", max_position_embeddings=1024)
    out = tmp_path / "agents"
    argv = ["bench", "agents", "--model", str(model), "--arms", "sagellm,sagellm-tiers,vllm", "--out", str(out)]
    argv += ["--sessions", "4", "--turns", "3", "--prefix-tokens", "160", "--tool-tokens", "24", "--max-tokens", "8"]
    argv += ["--restart-after", "2", "--cache-sessions", "2", "--ram-gb", "0.05", "--peers-dir", str(tmp_path)]
    argv += ["--logs", str(tmp_path / "logs")]
    assert main(argv) == 0

    printed = capsys.readouterr().out
    assert "| sagellm |" in printed and "| sagellm-tiers |" in printed and "\nCPU: " in printed
    assert "- vllm: not run: the peers serve smollm2-135m-instruct only" in printed
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["workload"]["sessions"] == 4 and results["our_kv_cache"]["kv_blocks"] > 0
    for name in ("sagellm", "sagellm-tiers"):
        arm = results["arms"][name]
        assert len(arm["turns"]) == 12 and arm["restart_s"] > 0
        summary = arm["summary"]
        assert set(summary) == {"first", "returning", "after restart", "first after restart"}
        assert all(phase["failed"] == 0 and phase["ttft_p50_ms"] > 0 for phase in summary.values())
        assert all(t["cached_tokens"] is not None and t["prompt_tokens"] > 160 for t in arm["turns"])
    assert "--kv-offload-dir" in results["arms"]["sagellm-tiers"]["flags"]
    assert "--kv-offload-dir" not in results["arms"]["sagellm"]["flags"]
    assert "--restart-after 2" in results["command"] and results["cpu"]
    logs = {f"{arm}{when}.log" for arm in ("sagellm", "sagellm-tiers") for when in ("", "-before-restart")}
    assert {path.name for path in (tmp_path / "logs").iterdir()} == logs
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_w1_overhead_check_compares_our_server_without_and_with_the_tiers(tmp_path, capsys):
    model = make_tiny_llama(tmp_path / "tiny-llama", max_position_embeddings=1024)
    out = tmp_path / "agents"
    argv = ["bench", "agents", "--w1-overhead", "--model", str(model), "--repeats", "1", "--w1-prompts", "4"]
    assert main([*argv, "--ram-gb", "0.05", "--out", str(out)]) in (0, 1)  # 1: the gate missed (speed: not asserted)

    printed = capsys.readouterr().out
    assert "| sagellm |" in printed and "| sagellm-tiers |" in printed and "Gate (at most 3% worse):" in printed
    results = json.loads((tmp_path / "agents_w1_overhead.json").read_text())
    assert {name: m["completed"] for name, m in results["medians"].items()} == {"sagellm": 4, "sagellm-tiers": 4}
    assert results["command"].endswith("--w1-prompts 4") and "--sessions" not in results["command"]
    assert (tmp_path / "agents_w1_overhead.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_across_instances_fetches_second_turns_from_the_other_instance(tmp_path, capsys):
    """Two instances, each session's second turn on the other: fetched whole from the first where route reads the
    events, computed where it does not, found on the holder under cache_aware."""
    model = make_tiny_llama(tmp_path / "tiny-llama", max_position_embeddings=1024)
    out = tmp_path / "agents"
    argv = ["bench", "agents", "--across-instances", "--model", str(model), "--sessions", "2", "--prefix-tokens", "160"]
    argv += ["--tool-tokens", "24", "--max-tokens", "8", "--cache-sessions", "2", "--ram-gb", "0.05", "--out", str(out)]
    assert main(argv) == 0

    printed = capsys.readouterr().out
    assert "| fetch |" in printed and "| recompute |" in printed and "| holder |" in printed and "\nCPU: " in printed
    arms = json.loads((tmp_path / "agents_instances.json").read_text())["arms"]
    second = {name: [t for t in arm["turns"] if t["turn"] == 2] for name, arm in arms.items()}
    assert all(len(turns) == 2 and not any(t["error"] for t in turns) for turns in second.values())
    assert all((t["cached_by_tier"] or {}).get("peer", 0) >= 160 for t in second["fetch"]), second["fetch"]
    assert all(not (t["cached_by_tier"] or {}).get("peer") for t in second["recompute"] + second["holder"])
    assert all(t["cached_tokens"] >= 160 for t in second["holder"])
    assert (tmp_path / "agents_instances.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
