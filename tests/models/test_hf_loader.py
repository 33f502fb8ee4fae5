"""Hugging Face directories load into exactly the weights and config transformers itself sees."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from sagellm.runtime.models.loader import load_model
from tests.tiny_models import CHAT_TEMPLATE, make_tiny_llama


def _hf_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # the same tensor as the embedding; the contract leaves it out
    return state


def _assert_same_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == torch.float32, name
        assert torch.equal(ours[name], tensor), name


def test_llama_round_trip(tiny_llama: Path) -> None:
    loaded = load_model(tiny_llama)
    _assert_same_weights(loaded.weights, _hf_state_dict(tiny_llama))
    c = loaded.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size) == ("llama", 320, 64, 128)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 4, 2, 16)
    assert (c.rms_norm_eps, c.rope_theta, c.max_position_embeddings) == (1e-5, 10000.0, 256)
    assert not c.tie_word_embeddings and not c.qkv_bias and c.rope_scaling is None
    assert (c.bos_token_id, c.eos_token_ids) == (0, (2,))
    assert "lm_head.weight" in loaded.weights
    assert (loaded.name, loaded.source, loaded.chat_template) == ("tiny-llama", tiny_llama, CHAT_TEMPLATE)
    assert loaded.tokenizer is not None and loaded.tokenizer.eos_token_id == 2
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n"


def test_qwen2_round_trip_with_bias_and_tied_embeddings(tiny_qwen2: Path) -> None:
    loaded = load_model(tiny_qwen2)
    _assert_same_weights(loaded.weights, _hf_state_dict(tiny_qwen2))
    c = loaded.config
    assert c.architecture == "qwen2" and c.qkv_bias and c.tie_word_embeddings
    assert "lm_head.weight" not in loaded.weights
    assert loaded.weights["model.layers.1.self_attn.k_proj.bias"].shape == (2 * 16,)


def test_dtype_and_no_tokenizer(tiny_llama: Path) -> None:
    loaded = load_model(tiny_llama, dtype=torch.bfloat16, load_tokenizer=False)
    assert loaded.tokenizer is None and loaded.chat_template == CHAT_TEMPLATE  # read from the files directly
    assert all(t.dtype == torch.bfloat16 for t in loaded.weights.values())
    reference = _hf_state_dict(tiny_llama)["model.norm.weight"].to(torch.bfloat16)
    assert torch.equal(loaded.weights["model.norm.weight"], reference)


def test_sharded_checkpoint(tmp_path: Path, tiny_llama: Path) -> None:
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    loaded = load_model(tmp_path / "sharded", load_tokenizer=False)
    _assert_same_weights(loaded.weights, _hf_state_dict(tiny_llama))


def test_eos_ids_from_config_list_and_generation_config(tmp_path: Path) -> None:
    model_dir = make_tiny_llama(tmp_path / "m", eos_token_id=[2, 1])
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 0]}))
    assert load_model(model_dir, load_tokenizer=False).config.eos_token_ids == (2, 1, 0)


def test_llama3_rope_scaling_and_legacy_config_keys(tmp_path: Path) -> None:
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model_dir = make_tiny_llama(tmp_path / "m", rope_scaling={"rope_type": "llama3", **scaling}, rope_theta=500000.0)
    config = load_model(model_dir, load_tokenizer=False).config
    assert config.rope_theta == 500000.0 and config.rope_scaling == {"rope_type": "llama3", **scaling}
    assert AutoConfig.from_pretrained(model_dir).rope_parameters["rope_type"] == "llama3"

    # Hub configs written before transformers 5 spell it rope_theta + rope_scaling {"type": ...}.
    raw = json.loads((model_dir / "config.json").read_text())
    del raw["rope_parameters"]
    raw |= {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **scaling}}
    (model_dir / "config.json").write_text(json.dumps(raw))
    config = load_model(model_dir, load_tokenizer=False).config
    assert config.rope_theta == 500000.0 and config.rope_scaling == {"rope_type": "llama3", **scaling}


def test_tied_llama_drops_duplicate_lm_head(tmp_path: Path) -> None:
    model_dir = make_tiny_llama(tmp_path / "m", tie_word_embeddings=True)
    reference = _hf_state_dict(model_dir)
    # Some tied checkpoints still store the shared matrix a second time as lm_head.weight.
    weights = load_file(model_dir / "model.safetensors")
    save_file(
        weights | {"lm_head.weight": weights["model.embed_tokens.weight"].clone()}, model_dir / "model.safetensors"
    )
    loaded = load_model(model_dir, load_tokenizer=False)
    assert loaded.config.tie_word_embeddings and "lm_head.weight" not in loaded.weights
    _assert_same_weights(loaded.weights, reference)
