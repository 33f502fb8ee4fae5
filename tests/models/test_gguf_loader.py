"""GGUF files load into the Hugging Face weights: exactly for float files (after undoing llama.cpp's q/k row
permutation), within the quantization error for quantized ones, and equal to what transformers loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from sagellm.runtime.models.loaded import LoadedModel
from sagellm.runtime.models.loader import load_model
from tests.tiny_models import CHAT_TEMPLATE, make_tiny_llama, quantize, write_tiny_gguf

Q = GGMLQuantizationType
SAMPLES = ["hello world", "The quick brown fox <|im_end|> 12345!", "<|im_start|>user\nwhat?<|im_end|>\n"]


def _max_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def hf_llama(tiny_llama: Path) -> LoadedModel:
    return load_model(tiny_llama)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of 256 values, as k-quants need."""
    directory = tmp_path_factory.mktemp("wide") / "wide-llama"
    return make_tiny_llama(directory, hidden_size=256, intermediate_size=512, num_attention_heads=4)


def test_f32_llama_equals_hf_exactly(tmp_path: Path, tiny_llama: Path, hf_llama: LoadedModel) -> None:
    loaded = load_model(write_tiny_gguf(tmp_path / "m.gguf", tiny_llama, "F32"))
    assert _max_error(loaded.weights, hf_llama.weights) == 0.0
    assert loaded.config == hf_llama.config  # every field, from GGUF metadata
    assert (loaded.name, loaded.source, loaded.chat_template) == ("m", tmp_path / "m.gguf", CHAT_TEMPLATE)
    for text in SAMPLES:
        assert loaded.tokenizer(text)["input_ids"] == hf_llama.tokenizer(text)["input_ids"]
    assert loaded.tokenizer.eos_token_id == 2


def test_f32_qwen2_is_not_permuted_and_ties_embeddings(tmp_path: Path, tiny_qwen2: Path) -> None:
    hf = load_model(tiny_qwen2, load_tokenizer=False)
    loaded = load_model(write_tiny_gguf(tmp_path / "q.gguf", tiny_qwen2, "F32"), load_tokenizer=False)
    assert loaded.config == hf.config and loaded.config.qkv_bias and loaded.config.tie_word_embeddings
    assert "output.weight" not in [t.name for t in GGUFReader(tmp_path / "q.gguf").tensors]
    assert _max_error(loaded.weights, hf.weights) == 0.0


def test_q8_0_equals_gguf_reference_and_is_close_to_hf(tmp_path: Path, tiny_llama: Path, hf_llama: LoadedModel) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_llama, "Q8_0")
    loaded = load_model(path, load_tokenizer=False)
    embed = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    assert embed.tensor_type == Q.Q8_0
    reference = dequantize(embed.data, Q.Q8_0).reshape(loaded.config.vocab_size, loaded.config.hidden_size)
    assert torch.equal(loaded.weights["model.embed_tokens.weight"], torch.from_numpy(reference))
    assert 0 < _max_error(loaded.weights, hf_llama.weights) < 2e-3


@pytest.mark.parametrize(
    ("qtype", "tolerance"),
    # weights are ~N(0, 0.02) up to 0.1: a wrong block layout would be off by ~0.1
    [("F16", 1e-4), ("BF16", 1e-3), ("Q4_0", 1.5e-2), ("Q4_1", 1e-2), ("Q5_0", 6e-3), ("Q4_K", 1e-2), ("Q6_K", 3e-3)],
)
def test_quantized_types_load_close_to_hf(tmp_path: Path, wide_llama: Path, qtype: str, tolerance: float) -> None:
    hf = load_model(wide_llama, load_tokenizer=False)
    path = write_tiny_gguf(tmp_path / f"{qtype}.gguf", wide_llama, qtype)
    assert {t.tensor_type.name for t in GGUFReader(path).tensors} == {qtype, "F32"}
    loaded = load_model(path, load_tokenizer=False)
    assert loaded.config == hf.config
    assert 0 < _max_error(loaded.weights, hf.weights) < tolerance


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_k_quant_test_encoders_are_valid(qtype: GGMLQuantizationType) -> None:
    """The Q4_K/Q6_K writers above are ours (gguf-py cannot quantize them): check gguf-py decodes them to within
    half a quantization step of every value, so the load tests rest on valid blocks."""
    values = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    decoded = dequantize(quantize(values, qtype), qtype)
    blocks = values.reshape(-1, 256)
    step = (blocks.max(1) - blocks.min(1)) / 15 if qtype == Q.Q4_K else np.abs(blocks).max(1) / 31  # [n]
    assert np.all(np.abs(decoded.reshape(-1, 256) - blocks) <= step[:, None] * 0.51 + 1e-3)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model_dir = make_tiny_llama(
        tmp_path / "m", hidden_size=256, num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", **scaling},
    )  # fmt: skip
    config = load_model(write_tiny_gguf(tmp_path / "m.gguf", model_dir), load_tokenizer=False).config
    assert config.rope_theta == 500000.0 and config.rope_scaling["rope_type"] == "llama3"
    for key, value in scaling.items():
        assert config.rope_scaling[key] == pytest.approx(value, rel=1e-4), key


def test_transformers_loads_the_same_weights_from_our_gguf(tmp_path: Path, tiny_llama: Path, tiny_qwen2: Path) -> None:
    """transformers' own GGUF reader (its own q/k un-permutation) agrees with ours on the same files."""
    from transformers import AutoModelForCausalLM

    for hf_dir in (tiny_llama, tiny_qwen2):
        path = write_tiny_gguf(tmp_path / f"{hf_dir.name}.gguf", hf_dir, "Q8_0")
        ours = load_model(path, load_tokenizer=False)
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        state = {k: v for k, v in theirs.state_dict().items() if k in ours.weights}
        assert _max_error(ours.weights, state) == 0.0


def test_tokenizer_saved_beside_a_lone_gguf_is_used(tmp_path: Path, tiny_llama: Path) -> None:
    """The model cache saves a GGUF's tokenizer beside it, because building it from metadata takes seconds."""
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_llama)
    tokenizer = load_model(path).tokenizer
    tokenizer.model_max_length = 1234  # marks the saved copy
    tokenizer.save_pretrained(tmp_path)
    assert load_model(path).tokenizer.model_max_length == 1234
    assert load_model(tmp_path).tokenizer.model_max_length == 1234

    write_tiny_gguf(tmp_path / "other.gguf", tiny_llama)  # no longer clear whose tokenizer files those are
    assert load_model(path).tokenizer.model_max_length != 1234


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_config_only(tmp_path: Path, tiny_qwen2: Path, fmt: str) -> None:
    path = tiny_qwen2 if fmt == "hf" else write_tiny_gguf(tmp_path / "q.gguf", tiny_qwen2, "Q8_0")
    loaded = load_model(path, load_weights=False, load_tokenizer=False)
    assert loaded.weights == {} and loaded.tokenizer is None
    assert loaded.config == load_model(tiny_qwen2, load_tokenizer=False).config
