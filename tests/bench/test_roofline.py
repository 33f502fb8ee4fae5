"""`sagellm bench roofline --quick` end to end on two tiny random models, a Hugging Face checkpoint (fp32 floats) and
its Q4_K_M GGUF (blocks): the table names the CPU and every measure, the JSON holds every field with a positive
number (a peak this CPU has no instructions for is None and says so), the chart is a PNG. Nothing here is timed."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from sagellm.backends.native.isa import cpu_flags
from sagellm.benchmarks.decode_parts import PARTS
from tests.tiny_models import make_tiny_llama, write_tiny_gguf

pytestmark = pytest.mark.slow

# Whole Q4_K super-blocks of 256 inputs in every linear; 2 layers; positions for the quick prompts.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


def _positive_numbers(value, where: str = "") -> list[str]:
    """The paths of every number in `value` that is not a positive finite number."""
    if isinstance(value, dict):
        return [bad for k, v in value.items() for bad in _positive_numbers(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [bad for i, v in enumerate(value) for bad in _positive_numbers(v, f"{where}[{i}]")]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return []
    return [] if value > 0 and math.isfinite(value) else [f"{where}={value}"]


def test_quick_run_prints_the_cpu_and_writes_every_measure(tmp_path):
    hf_dir = make_tiny_llama(tmp_path / "llama", **SHAPE)
    gguf = write_tiny_gguf(tmp_path / "llama.Q4_K_M.gguf", hf_dir, "Q4_K_M")
    out = tmp_path / "results" / "roofline"
    command = [sys.executable, "-m", "sagellm.cli.main", "bench", "roofline", "--quick", "--models",
               f"{hf_dir},{gguf}", "--out", str(out)]  # fmt: skip
    ran = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr

    assert "CPU: " in ran.stdout and "cores" in ran.stdout
    for words in ("read bandwidth, GB/s", "peak fp32", "peak int8", "peak int16", "of read roofline", "of int16 peak"):
        assert words in ran.stdout, words
    # decode, where its step's time goes, 2 prefills
    assert ran.stdout.count(f"| {hf_dir} |") == 4 and ran.stdout.count(f"| {gguf} |") == 4
    assert "[roofline]" in ran.stderr  # progress lines

    results = json.loads(out.with_suffix(".json").read_text())
    machine = results["machine"]
    assert machine["read_gbs"].keys() == {str(t) for t in machine["threads"]}
    for kind, peak in machine["peaks"].items():
        assert (peak is None) == machine["kernels"][kind].startswith("not available"), kind
    assert machine["peaks"]["fp32"] is not None or not {"fma", "avx2"} <= cpu_flags()
    hf, quantized = results["models"]
    assert hf["weights"]["formats"] == {"F32": 2 * 7 + 1}  # 7 linears a layer, lm_head (untied)
    assert set(quantized["weights"]["formats"]) <= {"Q4_K", "Q6_K"}
    assert "int8 dot products" in quantized["decode"]["path"]
    assert [p["tokens"] for p in hf["prefill"]] == [32, 64]
    for row in results["models"]:
        for key in ("tpot_ms", "bytes", "gbs", "of_bandwidth", "linears_ms", "linears_gbs", "linears_1_thread_gbs"):
            assert key in row["decode"], key
        parts = row["decode"]["parts_ms"]
        assert set(parts) == {*PARTS, "step"} and parts["decoder layers"] < parts["step"]
        for key in ("ms", "flops", "gflops", "of_fp32_peak", "of_int16_peak"):
            assert all(key in p for p in row["prefill"]), key
    assert _positive_numbers(results) == []
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
