"""Smoke test of `sagellm bench offline`: on a tiny random Llama, both engines run every workload end to end and the
command writes its JSON, PNG and markdown. Nothing here is timed; real numbers come from the command itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sagellm.cli.main import main

pytest.importorskip("matplotlib")

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Benchmarks compare engines on the same inputs."] * 8


def _tiny_model(root: Path) -> Path:
    """A 2-layer Llama with a byte-level BPE trained here, saved as a Hugging Face directory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    path = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_bench_offline_writes_json_png_and_markdown(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path)
    out, plot, markdown = tmp_path / "offline.json", tmp_path / "offline.png", tmp_path / "offline.md"
    argv = ["bench", "offline", "--model", str(model), "--num-prompts", "3", "--input-len", "12", "--output-len", "4"]
    argv += ["--repeats", "2", "--threads", "1", "--out", str(out), "--plot", str(plot), "--markdown", str(markdown)]

    assert main(argv) == 0

    results = json.loads(out.read_text())
    names = [w["name"] for w in results["workloads"]]
    assert names == ["w1-c16", "w1-c1", "w2-3"]  # W2's 16 and 64 both capped to 3 prompts: one workload
    rows = {(r["workload"], r["engine"]): r for r in results["results"]}
    assert set(rows) == {(w, e) for w in names for e in ("sagellm", "transformers")}
    for row in rows.values():
        assert row["out_tok_s"] > 0 and row["wall_s"] > 0 and row["ttft_p50_ms"] > 0 and row["tpot_p50_ms"] > 0
        assert len(row["runs"]) == 2
    assert set(results["agreement"]) == set(names)
    assert results["machine"]["torch_threads"] == 1 and results["machine"]["cores"] >= 1
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    table = markdown.read_text()
    assert "| w1-c1 | sagellm |" in table and "| w1-c1 | transformers |" in table
