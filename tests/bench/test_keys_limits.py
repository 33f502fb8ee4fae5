"""`sagellm bench keys`'s own parts: its keys file is one the gateway reads, and its table and acceptance read its
rounds."""

from __future__ import annotations

import argparse

from sagellm.benchmarks.keys_limits import (
    OPEN_KEY,
    acceptance,
    accepted_miss,
    add_arguments,
    keys_file,
    limited_key,
    markdown,
)
from sagellm.gateway.http.auth import key_digest
from sagellm.gateway.keys.keys_file import read_keys_file


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_keys_file_is_one_the_gateway_reads_with_a_limited_key_per_round(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_bytes(keys_file(_args("--rounds", "3", "--requests-per-minute", "45")))
    keys = {policy.name: policy for policy in read_keys_file(path)}
    assert list(keys) == ["open", "limited-0", "limited-1", "limited-2"]
    assert keys["open"].digest == key_digest(OPEN_KEY) and keys["open"].requests_per_minute is None
    assert [keys[f"limited-{n}"].requests_per_minute for n in range(3)] == [45] * 3
    assert keys["limited-2"].digest == key_digest(limited_key(2))


def _round(number: int, mixed_p99: float, accepted: int, inside: bool = True) -> dict:
    run = {"completed": 64, "failed": 0, "p50_ttft_ms": 600.0, "p99_ttft_ms": 1000.0, "p50_tpot_ms": 25.0,
           "p99_tpot_ms": 30.0, "output_throughput": 120.0}  # fmt: skip
    limited = {"offered": 240, "accepted": accepted, "expected": 120, "miss": accepted_miss(accepted, 120),
               "rate_limited": 240 - accepted, "client_429s": 240 - accepted, "window_full_s": 31.2,
               "open_inside": inside, "api_server_cpu_s": [3.25, 2.9]}  # fmt: skip
    return {"round": number, "alone": run, "mixed": {**run, "p99_ttft_ms": mixed_p99}, "limited": limited,
            "ttft_p99_ratio": mixed_p99 / 1000.0}  # fmt: skip


def test_the_table_has_both_runs_of_the_open_key_and_what_became_of_the_limited_keys_requests():
    table = markdown([_round(0, 1100.0, 118)])
    assert "| 0 | alone | 64 / 0 | 600 / 1000 | 25.0 / 30.0 | 120.0 |" in table
    assert "| 0 | mixed | 64 / 0 | 600 / 1100 | 25.0 / 30.0 | 120.0 |" in table
    assert "| 0 | 1.10x | 240 | 118 (120) | 1.7% | 122 / 122 | 31 | True | 3.2 / 2.9 |" in table


def test_acceptance_wants_the_ratio_the_limit_within_five_percent_and_a_mixed_run_inside_the_load():
    assert accepted_miss(114, 120) == 0.05
    passed, line = acceptance([_round(0, 1100.0, 120), _round(1, 1250.0, 126)])
    assert passed and "1.18x" in line and "5.0% off" in line and line.endswith("PASS")
    assert not acceptance([_round(0, 1100.0, 127)])[0]  # 5.8% more let in than the limit allows
    assert not acceptance([_round(0, 1250.0, 120)])[0]
    assert not acceptance([_round(0, 1000.0, 120, inside=False)])[0]
