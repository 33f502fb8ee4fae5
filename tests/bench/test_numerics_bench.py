"""Smoke test of `sagellm bench numerics`: on a tiny random Qwen2 written as a Q4_1 GGUF, the float32 engine and the
int8-activations one answer the same chat prompts, and the command prints their agreement and logit error. Nothing
here is timed; the measurement is the command itself on the default model."""

from __future__ import annotations

import pytest

from sagellm.cli.main import main
from tests.tiny_models import make_tiny_qwen2, write_tiny_gguf

pytestmark = pytest.mark.slow  # a benchmark command: two engines


def test_bench_numerics_compares_int8_activations_with_float32(tmp_path, capsys) -> None:
    gguf = write_tiny_gguf(tmp_path / "qwen2.Q4_1.gguf", make_tiny_qwen2(tmp_path / "qwen2"), "Q4_1")
    argv = ["bench", "numerics", "--model", str(gguf), "--mode", "int8-activations", "--prompts", "0"]
    assert main([*argv, "--max-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "| sageLLM int8-activations | " in printed and "/32 |" in printed
    assert "sageLLM int8-activations, logits of the" in printed and "error max / mean" in printed
