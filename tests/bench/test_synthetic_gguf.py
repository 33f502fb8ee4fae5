"""`sagellm bench make-gguf`'s writer (benchmarks/synthetic_gguf.py) on a small shape: llama.cpp's Q4_K_M types per
tensor, SmolLM2's tokenizer keys copied as they are, weights spread as a trained model's, the same file whatever the
number of workers, and a file our loader reads; and `sagellm bench kquant`'s reading of llama-bench's JSON."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from sagellm.benchmarks.kquant import parse_llama_bench
from sagellm.benchmarks.synthetic_gguf import WEIGHT_STD, write_llama_q4_k_m
from sagellm.runtime.models.loader import load_model

pytestmark = [pytest.mark.network, pytest.mark.slow]  # the tokenizer is SmolLM2's; a few seconds each

SHAPE = dict(hidden=256, layers=8, intermediate=512, heads=4, kv_heads=2)  # whole super-blocks everywhere


@pytest.fixture(scope="module")
def written(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("synthetic")
    path = write_llama_q4_k_m(root / "small.gguf", **SHAPE, tied=False, tokenizer_from=smollm2_dir, progress=False)
    return path, next(smollm2_dir.glob("*.gguf"))


def test_tensors_take_llama_cpps_q4_k_m_types(written):
    path, _ = written
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    q4, q6, f32 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K, GGMLQuantizationType.F32
    more_bits = {0, 3, 6, 7}  # use_more_bits of 8 layers: the first and last eighth, and every third between
    for i in range(8):
        expected = q6 if i in more_bits else q4
        assert types[f"blk.{i}.attn_v.weight"] == types[f"blk.{i}.ffn_down.weight"] == expected, i
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == q4
        assert types[f"blk.{i}.attn_norm.weight"] == f32
    assert types["output.weight"] == q6 and types["token_embd.weight"] == q4  # untied: the embedding is Q4_K


def test_the_tokenizer_keys_are_smollm2s_and_set_the_vocabulary(written):
    path, source = written
    ours, theirs = gguf.GGUFReader(path).fields, gguf.GGUFReader(source).fields
    keys = [key for key in theirs if key.startswith("tokenizer.")]
    assert "tokenizer.chat_template" in keys and "tokenizer.ggml.merges" in keys
    for key in keys:
        assert ours[key].contents() == theirs[key].contents(), key
    loaded = load_model(path, load_weights=False)
    assert loaded.config.vocab_size == len(theirs["tokenizer.ggml.tokens"].contents()) == 49152
    assert loaded.config.hidden_size == 256 and loaded.config.num_layers == 8
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("Hello there")) == "Hello there"


def test_weights_are_spread_as_a_trained_models_and_norms_are_about_one(written):
    path, _ = written
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    up = tensors["blk.1.ffn_up.weight"]
    values = gguf.quants.dequantize(up.data, up.tensor_type)
    assert abs(values.std() - WEIGHT_STD) < 0.1 * WEIGHT_STD and abs(values.mean()) < 1e-3
    norm = np.asarray(tensors["blk.1.attn_norm.weight"].data)
    assert abs(norm.mean() - 1) < 0.01 and 0 < norm.std() < 0.05


def test_the_file_does_not_depend_on_the_number_of_workers(written, smollm2_dir, tmp_path):
    path, _ = written
    again = write_llama_q4_k_m(tmp_path / "again.gguf", **SHAPE, tied=False, tokenizer_from=smollm2_dir,
                               workers=1, progress=False)  # fmt: skip
    assert again.read_bytes() == path.read_bytes()


def test_llama_bench_json_gives_prefill_and_decode_rates():
    text = """[{"n_prompt": 128, "n_gen": 0, "avg_ts": 65.3, "stddev_ts": 1.5},
               {"n_prompt": 0, "n_gen": 128, "avg_ts": 12.25, "stddev_ts": 0.5}]"""
    assert parse_llama_bench(text) == {
        "prefill_tok_s": 65.3,
        "prefill_stddev": 1.5,
        "decode_tok_s": 12.25,
        "decode_stddev": 0.5,
    }
