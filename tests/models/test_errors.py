"""Every way a model can fail to load is one ModelLoadError whose one-line message names the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from tests.tiny_models import make_tiny_gpt_oss, make_tiny_qwen3_5, write_tiny_gguf


def _load_error(path: Path, **kwargs: bool) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_model(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_wrong_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert _load_error(missing) == f"{missing}: no such file or directory"


def test_empty_directory(tmp_path: Path) -> None:
    assert _load_error(tmp_path).startswith(f"{tmp_path}: not a model directory")


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 64)
    assert _load_error(path).startswith(f"{path}: not a GGUF file")


def test_directory_with_several_gguf_files(tmp_path: Path, tiny_llama: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        write_tiny_gguf(tmp_path / name, tiny_llama)
    assert "several .gguf files (a.gguf, b.gguf)" in _load_error(tmp_path)


def test_truncated_safetensors(tmp_path: Path, tiny_llama: Path) -> None:
    model_dir = _copy(tiny_llama, tmp_path / "m")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    message = _load_error(model_dir)
    assert message.startswith(f"{weights}: corrupt or truncated safetensors file")


def test_no_safetensors(tmp_path: Path, tiny_llama: Path) -> None:
    model_dir = _copy(tiny_llama, tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    assert "no *.safetensors weights" in _load_error(model_dir)


@pytest.mark.parametrize("keep", [16, 2000, -1000])
def test_truncated_gguf(tmp_path: Path, tiny_llama: Path, keep: int) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_llama, "Q8_0")
    path.write_bytes(path.read_bytes()[:keep])
    assert _load_error(path).startswith(f"{path}: corrupt or truncated GGUF file")


def test_unsupported_hf_architecture(tmp_path: Path, tiny_llama: Path) -> None:
    model_dir = _copy(tiny_llama, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    message = _load_error(model_dir)
    assert message.startswith(f"{model_dir / 'config.json'}: unsupported architecture GPT2LMHeadModel (supported: ")
    assert "Qwen3ForCausalLM" in message and "Gemma3ForCausalLM" in message and "Phi3ForCausalLM" in message


def test_unsupported_gguf_architecture_and_quant_type(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    _write(writer)
    supported = ("llama, qwen2, qwen3, qwen3moe, gemma2, gemma3, gemma3n, gemma4, phi3, gpt-oss, qwen35, qwen35moe, "
                 "qwen3next")
    assert _load_error(path) == f"{path}: unsupported GGUF architecture 'gpt2' (supported: {supported})"

    writer = gguf.GGUFWriter(path, "llama")
    iq4_nl = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL][1]  # bytes per 32-value block
    blocks = np.zeros((4, iq4_nl), dtype=np.uint8)
    writer.add_tensor("token_embd.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    _write(writer)
    message = _load_error(path)
    assert message.startswith(f"{path}: tensor token_embd.weight has unsupported quantization type IQ4_NL")


def test_missing_tensor(tmp_path: Path, tiny_llama: Path) -> None:
    model_dir = _copy(tiny_llama, tmp_path / "m")
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, model_dir / "model.safetensors")
    assert _load_error(model_dir) == f"{model_dir}: missing tensor model.layers.1.mlp.up_proj.weight"


def test_wrong_shape_and_unexpected_tensor(tmp_path: Path, tiny_llama: Path) -> None:
    model_dir = _copy(tiny_llama, tmp_path / "m")
    weights = load_file(model_dir / "model.safetensors")
    weights["model.norm.weight"] = np.ones(3, dtype=np.float32)
    save_file(weights, model_dir / "model.safetensors")
    assert "tensor model.norm.weight has shape (3,), expected (64,)" in _load_error(model_dir)

    weights["model.norm.weight"] = np.ones(64, dtype=np.float32)
    weights["model.layers.0.self_attn.o_proj.bias"] = np.ones(64, dtype=np.float32)
    save_file(weights, model_dir / "model.safetensors")
    assert "unexpected tensor model.layers.0.self_attn.o_proj.bias" in _load_error(model_dir)


def test_missing_tokenizer(tmp_path: Path, tiny_llama: Path) -> None:
    model_dir = _copy(tiny_llama, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    assert _load_error(model_dir).startswith(f"{model_dir}: no tokenizer files")
    assert load_model(model_dir, load_tokenizer=False).tokenizer is None


def _write(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_missing_a_tensor_names_it(tmp_path: Path) -> None:
    """A gpt-oss GGUF without a layer's attention sinks: the error names the tensor, not a failure far from it."""
    path = write_tiny_gguf(
        tmp_path / "lacking.gguf", make_tiny_gpt_oss(tmp_path / "hf"), drop=("blk.1.attn_sinks.weight",)
    )
    assert _load_error(path) == f"{path}: missing tensor model.layers.1.self_attn.sinks"


def test_a_config_with_an_unknown_layer_type_names_it(tmp_path: Path) -> None:
    model_dir = make_tiny_gpt_oss(tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["layer_types"][2] = "linear_attention"
    (model_dir / "config.json").write_text(json.dumps(config))
    message = _load_error(model_dir)
    known = "sliding_attention, full_attention"
    assert (
        message
        == f"{model_dir / 'config.json'}: layer_types[2] is 'linear_attention', not a layer type of gpt_oss ({known})"
    )


def test_a_qwen3_5_gguf_missing_a_delta_net_tensor_names_it(tmp_path: Path) -> None:
    """A Qwen3.5 GGUF without a Gated DeltaNet layer's decay (ssm_a): named by the checkpoint's name for it."""
    path = write_tiny_gguf(tmp_path / "lacking.gguf", make_tiny_qwen3_5(tmp_path / "hf"), drop=("blk.2.ssm_a",))
    assert _load_error(path) == f"{path}: missing tensor model.layers.2.linear_attn.A_log"


def test_a_qwen3_5_config_with_a_sliding_layer_names_it(tmp_path: Path) -> None:
    model_dir = make_tiny_qwen3_5(tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["layer_types"][1] = "sliding_attention"
    (model_dir / "config.json").write_text(json.dumps(config))
    known = "linear_attention, full_attention"
    problem = f"layer_types[1] is 'sliding_attention', not a layer type of qwen3_5 ({known})"
    assert _load_error(model_dir) == f"{model_dir / 'config.json'}: {problem}"
